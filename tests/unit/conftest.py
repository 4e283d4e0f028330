"""Tiny models and a step context for calling evaluation steps directly."""

from pathlib import Path

import pytest

from modules.core.profiles import Profile, get_profile
from modules.core.step import StepContext
from modules.storage.datasets import load_dataset
from modules.training.train import TrainParams, train_baseline


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def small_mlp(digits):
    """A 64-32-10 MLP trained for a few epochs: accurate enough, fast to copy and time."""
    artifact, _ = train_baseline(
        TrainParams(model="mlp", arch={"name": "mlp", "hidden": [32]}, epochs=8), digits, seed=0
    )
    return artifact


@pytest.fixture(scope="session")
def small_knn(digits):
    artifact, _ = train_baseline(TrainParams(model="knn"), digits, seed=0)
    return artifact


def make_ctx(tmp_path: Path, *, profile="edge-8mb", history=(), models=None, repeats=1, seed=0):
    """A StepContext whose load_model reads from a dict of key -> artifact."""
    models = models or {}
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return StepContext(
        job_id="t-job",
        user_id="tester",
        profile=prof,
        seed=seed,
        repeats=repeats,
        step_index=len(history),
        step_name="under_test",
        workdir=tmp_path,
        history=list(history),
        load_model=models.__getitem__,
    )


@pytest.fixture
def ctx_factory(tmp_path):
    def build(**kw):
        return make_ctx(tmp_path, **kw)

    return build


@pytest.fixture
def zero_step():
    """A throwaway torch step `t_zero`: zero the smallest `amount` of each Linear's weights."""
    import torch
    from pydantic import BaseModel, ConfigDict, Field

    from modules.core.registry import register_step, unregister_step
    from modules.core.step import StepOutput

    class ZeroParams(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        amount: float = Field(default=0.5, ge=0, lt=1, description="Share of weights zeroed.")
        note: str = Field(default="", description="Ignored.")

    @register_step("t_zero", params=ZeroParams, accepts={"torch"})
    def t_zero(model, data, params, ctx):
        """Zero the smallest weights of every Linear layer."""
        with torch.no_grad():
            for layer in model.obj.modules():
                if isinstance(layer, torch.nn.Linear) and params.amount > 0:
                    w = layer.weight
                    k = int(params.amount * w.numel())
                    cut = w.abs().flatten().kthvalue(max(k, 1)).values
                    w[w.abs() <= cut] = 0.0
        # A stand-in for a fine-tuning time, so repeated runs have one to summarize.
        return StepOutput(model=model, metrics={"train_time_s": 0.001 * (ctx.seed % 7 + 1)})

    yield "t_zero"
    unregister_step("t_zero")


@pytest.fixture
def slim_step():
    """A throwaway torch step `t_slim`: drop `amount` of the hidden neurons of a 1-hidden MLP."""
    import torch
    from pydantic import BaseModel, ConfigDict, Field

    from modules.core.artifact import ModelArtifact
    from modules.core.registry import register_step, unregister_step
    from modules.core.step import StepOutput

    class SlimParams(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        amount: float = Field(default=0.5, ge=0, lt=1, description="Share of neurons dropped.")

    @register_step("t_slim", params=SlimParams, accepts={"torch"})
    def t_slim(model, data, params, ctx):
        """Keep the hidden neurons with the largest incoming weight norms."""
        first, _, last = model.obj
        keep = max(1, round(first.out_features * (1 - params.amount)))
        idx = first.weight.norm(dim=1).argsort(descending=True)[:keep].sort().values
        a, b = torch.nn.Linear(first.in_features, keep), torch.nn.Linear(keep, last.out_features)
        with torch.no_grad():
            a.weight.copy_(first.weight[idx])
            a.bias.copy_(first.bias[idx])
            b.weight.copy_(last.weight[:, idx])
            b.bias.copy_(last.bias)
        slim = torch.nn.Sequential(a, torch.nn.ReLU(), b).eval()
        return StepOutput(model=ModelArtifact("torch", slim, dict(model.meta)))

    yield "t_slim"
    unregister_step("t_slim")
