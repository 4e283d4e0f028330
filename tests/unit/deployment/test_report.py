import base64
import csv
import io
import json
import re

from modules.core.jobspec import parse_job_spec
from modules.pipeline.local import LocalWorkspace

FAST = {"runs": 3, "warmup": 1}
# Accuracy does not matter here: two epochs keep the job short.
SMALL_MLP = {"model": "mlp", "arch": {"name": "mlp", "hidden": [32]}, "epochs": 2}
EVIL = '<script>alert("x")</script>'


def run_job(tmp_path, steps):
    spec = parse_job_spec({"job_id": "rep", "steps": steps})
    ws = LocalWorkspace(tmp_path)
    return ws, ws.run(spec)


def test_report_holds_every_step_and_embeds_its_plots(tmp_path):
    ws, result = run_job(
        tmp_path,
        [
            {"name": "train", "params": SMALL_MLP},
            {"name": "measure", "params": {"runs": 3}},
            {
                "name": "sweep",
                "params": {
                    "step": "measure",
                    "param": "runs",
                    "values": [2, 3],
                    "base_params": {"warmup": 0},
                    **FAST,
                },
            },
            {
                "name": "budget_sweep",
                "params": {"memory_budgets_mb": [0.01, 1], "compute_scales": [0.5, 1], **FAST},
            },
            {"name": "onnx_export"},
            {"name": "onnx_parity", "params": FAST},
            {"name": "hardware_sim", "params": FAST},
            {"name": "report", "params": {"title": EVIL}},
        ],
    )
    assert result.status == "COMPLETED", result.reason
    record = result.records[-1]
    files = {name: ws.store.get_bytes(key) for name, key in record.files.items()}
    html = files["report.html"].decode()
    earlier = result.records[:-1]

    # Every step is in the summary table and in the details.
    for r in earlier:
        assert f"step {r.index}: {r.step}" in html
        assert f'<td class="l">{r.step}</td>' in html
    # Gate verdicts with their reasons.
    assert "ONNX parity passed: label agreement 1.0000" in html
    assert "onnx.checker passed" in html
    # The plots are embedded (no server, no external files) and are real PNGs.
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    expected = {
        "waterfall",
        "02_sweep_pareto",
        "02_sweep_resources",
        "02_sweep_tradeoff",
        "03_budget_sweep_budget",
    }
    assert len(images) == len(expected) == len(record.metrics["plots"])
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert {f"{n}.png" for n in expected} <= files.keys()
    assert {f"{n}.svg" for n in expected} <= files.keys()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    # User text is escaped, never live markup.
    assert EVIL not in html and "&lt;script&gt;" in html

    report = json.loads(files["report.json"])
    assert [s["step"] for s in report["steps"]] == [r.step for r in earlier]
    assert {v["step"] for v in report["verdicts"]} == {"onnx_export", "onnx_parity"}
    assert report["status"] == "COMPLETED"
    assert report["config"]["profile"]["name"] == "edge-8mb"
    assert [s["name"] for s in report["config"]["steps"]][-1] == "report"
    assert report["dataset"]["fingerprint"] == earlier[0].dataset["fingerprint"]

    rows = list(csv.DictReader(io.StringIO(files["steps.csv"].decode())))
    assert [r["step"] for r in rows] == [r.step for r in earlier]
    hw = rows[-1]
    assert hw["step"] == "hardware_sim" and float(hw["energy_mj_estimate"]) > 0
    assert rows[5]["agreement"] == "1.0" and rows[5]["verdict"] == "pass"


def test_a_report_before_the_last_step_says_in_progress(tmp_path):
    ws, result = run_job(
        tmp_path,
        [
            {"name": "train", "params": {"model": "knn"}},
            {"name": "report", "params": {"plots": False}},
            {"name": "measure", "params": FAST},
        ],
    )
    assert result.status == "COMPLETED"
    record = result.records[1]
    report = json.loads(ws.store.get_bytes(record.files["report.json"]))
    assert report["status"] == "INPROGRESS" and len(report["steps"]) == 1
    html = ws.store.get_bytes(record.files["report.html"]).decode()
    assert "data:image/png" not in html and "step 0: train" in html
