import json

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from modules.cli import app
from modules.core.jobspec import parse_job_spec
from modules.errors import BadInputError
from modules.search.sweep import BudgetSweepParams, SweepParams, budget_sweep, sweep
from modules.storage.model_formats import save_model

FAST = {"runs": 3, "warmup": 1}


def weights(artifact):
    return [t.detach().clone() for t in artifact.obj.state_dict().values()]


def test_sweep_table_pareto_and_files(small_mlp, digits, ctx_factory, zero_step):
    before = weights(small_mlp)
    params = SweepParams(step=zero_step, param="amount", values=[0.0, 0.5, 0.9], **FAST)
    out = sweep(small_mlp, digits, params, ctx_factory())
    rows = out.metrics["rows"]
    assert out.model is None  # pass-through
    assert [r["label"] for r in rows] == ["input", "amount=0.0", "amount=0.5", "amount=0.9"]
    sparsity = [r["sparsity"] for r in rows]
    assert sparsity[1] < sparsity[2] < sparsity[3]
    assert rows[3]["sparsity"] == pytest.approx(0.9, abs=0.05)
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["size_bytes"] > 0
        lo, hi = r["latency_ci95"]
        assert lo <= r["latency_ms"] <= hi
        assert r["energy_mj_estimate"] == pytest.approx(
            2.0 * r["latency_ms"] / 0.75  # edge-8mb: 2 W, compute scale 0.75
        )
    front = out.metrics["pareto_front"]
    assert front and set(front) <= {r["label"] for r in rows}
    assert [r["label"] for r in rows if r["pareto"]] == front
    # The input model is untouched: the step ran on copies.
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(small_mlp), strict=True))
    assert out.files["sweep.csv"].decode().splitlines()[0].startswith("label,value,size_bytes")
    for name in ("sweep_tradeoff", "sweep_pareto", "sweep_resources"):
        assert out.files[f"{name}.png"].startswith(b"\x89PNG")
        assert b"<svg" in out.files[f"{name}.svg"][:500]
    assert json.loads(out.files["sweep.json"])["param"] == "amount"


def test_repeats_give_mean_ci_and_n(small_mlp, digits, ctx_factory, zero_step):
    params = SweepParams(step=zero_step, param="amount", values=[0.5], repeats=3, **FAST)
    rows = sweep(small_mlp, digits, params, ctx_factory(seed=5)).metrics["rows"]
    row = rows[1]
    assert row["n"] == 3 and len(row["seeds"]) == 3 and row["seeds"][0] == 5
    for key in ("accuracy", "latency_ms", "size_bytes", "energy_mj_estimate"):
        stat = row["stats"][key]
        assert stat["n"] == 3 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
    # The stand-in training time differs per seed, so its spread is real.
    train_time = row["stats"]["step.t_zero.train_time_s"]
    assert train_time["n"] == 3 and train_time["std"] > 0


def test_unknown_sweep_param_is_named(zero_step):
    with pytest.raises(ValidationError) as info:
        SweepParams(step=zero_step, param="amout", values=[0.1])
    message = str(info.value)
    assert "unknown sweep param 'amout'" in message and "amount, note" in message
    with pytest.raises(BadInputError, match="amout"):
        parse_job_spec(
            {
                "model": "users/local/models/x/model.pt",
                "steps": [
                    {
                        "name": "sweep",
                        "params": {"step": zero_step, "param": "amout", "values": [0.1]},
                    }
                ],
            }
        )


def test_bad_values_unknown_steps_and_unsweepable_steps(zero_step):
    with pytest.raises(ValidationError, match=r"amount=2"):
        SweepParams(step=zero_step, param="amount", values=[0.1, 2])
    with pytest.raises(ValidationError, match="unknown step 'no_such'"):
        SweepParams(step="no_such", param="amount", values=[0.1])
    with pytest.raises(ValidationError, match="cannot be swept"):
        SweepParams(step="sweep", param="values", values=[[1]])
    with pytest.raises(ValidationError, match="drop it from base_params"):
        SweepParams(step=zero_step, param="amount", values=[0.1], base_params={"amount": 0.2})


def test_budget_sweep_grid(small_mlp, digits, ctx_factory):
    params = BudgetSweepParams(
        memory_budgets_mb=[0.0105, 0.05, 8], compute_scales=[0.5, 1.0], **FAST
    )
    out = budget_sweep(small_mlp, digits, params, ctx_factory())
    rows = out.metrics["rows"]
    assert len(rows) == 6
    by = {(r["memory_budget_mb"], r["compute_scale"]): r for r in rows}
    # Half the speed, twice the (estimated) latency and energy: same measurement, scaled.
    for mem in (0.0105, 0.05, 8):
        assert by[(mem, 0.5)]["estimated_latency_ms"] == pytest.approx(
            2 * by[(mem, 1.0)]["estimated_latency_ms"]
        )
        assert by[(mem, 0.5)]["energy_mj_estimate"] == pytest.approx(
            2 * by[(mem, 1.0)]["energy_mj_estimate"]
        )
    batches = [by[(mem, 1.0)]["auto_batch"] or 0 for mem in (0.0105, 0.05, 8)]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    assert out.files["budget_sweep_grid.png"].startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"memory_budgets_mb": [1, 0]}, "memory_budgets_mb"),
        ({"memory_budgets_mb": [-2]}, "memory_budgets_mb"),
        ({"compute_scales": [0]}, "compute_scales"),
        ({"compute_scales": [-0.5]}, "compute_scales"),
    ],
)
def test_budget_sweep_refuses_nonpositive_values_by_name(params, needle):
    with pytest.raises(ValidationError, match=needle):
        BudgetSweepParams(**params)


runner = CliRunner()


def test_cli_sweep_and_its_errors(small_mlp, tmp_path, zero_step):
    model = tmp_path / "m.pt"
    model.write_bytes(save_model(small_mlp))
    base = ["sweep", "--model", str(model), "--out", str(tmp_path / "ws")]
    ok = runner.invoke(app, [*base, "--step", zero_step, "--param", "amount", "--values", "0,0.5"])
    assert ok.exit_code == 0, ok.output
    assert "Pareto front" in ok.output and "sweep.csv" in ok.output
    bad = runner.invoke(app, [*base, "--step", zero_step, "--param", "nope", "--values", "1"])
    assert bad.exit_code == 2 and "nope" in bad.output
    zero = runner.invoke(app, [*base, "--memory-budgets", "0,1"])
    assert zero.exit_code == 2 and "memory_budgets_mb" in zero.output
    none = runner.invoke(app, base)
    assert none.exit_code == 2 and "nothing to sweep" in none.output
