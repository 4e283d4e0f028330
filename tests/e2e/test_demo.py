"""`mcaas demo`: the embedded default runs every stage of both demo jobs and says where the
report is."""

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from modules.cli import DEMO_JOBS, app


def test_demo_runs_every_job_to_completion_and_writes_the_reports(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output

    combined = json.loads((out / "report.json").read_text())
    assert [j["status"] for j in combined["jobs"]] == ["COMPLETED"] * len(DEMO_JOBS)
    for job, spec in zip(combined["jobs"], DEMO_JOBS, strict=True):
        assert [s["step"] for s in job["steps"]] == [s["name"] for s in spec["steps"]]
        verdicts = {v["step"]: v["passed"] for v in job["verdicts"]}
        assert verdicts["onnx_export"] and verdicts["onnx_parity"]

    # The printed per-job report.html exists, embeds its plots and lists every step.
    paths = re.findall(r"report: (\S+report\.html)", result.output)
    assert len(paths) == len(DEMO_JOBS)
    for path, spec in zip(paths, DEMO_JOBS, strict=True):
        html = Path(path).read_text()
        assert "data:image/png;base64," in html
        for i, step in enumerate(spec["steps"][:-1]):
            assert f"step {i}: {step['name']}" in html
    index = (out / "report.html").read_text()
    assert index.count("report.html</a>") == len(DEMO_JOBS)
    assert f"report.html: {(out / 'report.html').resolve()}" in result.output
