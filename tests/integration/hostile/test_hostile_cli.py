"""Every hostile file against each CLI loader: exit 2 with `error:`, no output, nothing run.

The loaders: `load_model_file` (what every command uses), a technique script's main()
(`script_main` -> run_single_step), `mcaas run JOB` (LocalWorkspace.import_model and the job
spec reader) and `--dataset FILE.npz`. One script also runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from modules.cli import app
from modules.compression.quantize_dynamic import main as quantize_main
from modules.errors import McaasError
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import load_model_file
from tests.corpus.make_corpus import Specimen, checkpoint_bytes

ROOT = Path(__file__).resolve().parents[3]


def cli_specimens(corpus: list[Specimen], kind: str) -> list[Specimen]:
    return [s for s in corpus if s.kind == kind and s.cli]


def run_mcaas(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def test_model_files_are_refused_by_every_cli_loader(
    corpus: list[Specimen], marker: Path, tmp_path: Path
) -> None:
    rows = []
    for specimen in cli_specimens(corpus, "model"):
        path = Path(str(specimen.path))
        with pytest.raises(McaasError):
            load_model_file(path)
        out = tmp_path / f"{path.stem}-out.pt"
        assert quantize_main([str(path), str(out)]) == 2, specimen.name
        assert not out.exists(), f"{specimen.name}: an output was written"
        job = tmp_path / f"{path.stem}-job.json"
        job.write_text(json.dumps({"model": str(path), "steps": [{"name": "measure"}]}))
        result = run_mcaas(["run", str(job), "--artifacts", str(tmp_path / "ws")])
        assert result.exit_code == 2, f"{specimen.name}: {result.output}"
        rows.append({"name": specimen.name, "what": specimen.what, "loaders": 3, "exit": 2})
        assert not marker.exists(), f"{specimen.name} ran its payload"
    stored = list((tmp_path / "ws").rglob("model.*")) if (tmp_path / "ws").exists() else []
    assert stored == [], f"refused models were stored: {stored}"
    _dump("hostile_cli_models.json", rows)


def test_a_script_subprocess_refuses_a_payload(corpus: list[Specimen], marker: Path) -> None:
    specimen = next(s for s in corpus if s.name == "pt_zip_exec.pt")
    out = Path(str(specimen.path)).with_suffix(".out.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modules.compression.quantize_dynamic",
            str(specimen.path),
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "builtin" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not marker.exists()


def test_hostile_dataset_files_are_refused(
    corpus: list[Specimen], marker: Path, tmp_path: Path
) -> None:
    model = tmp_path / "valid.pt"
    model.write_bytes(checkpoint_bytes())
    for specimen in cli_specimens(corpus, "dataset"):
        # A local dataset may hold 2 GiB: the bombs are refused there, but not for their size.
        known = specimen.refusal and "over-inputs-cap" not in specimen.tags
        with pytest.raises(McaasError, match=re.escape(specimen.refusal or "") if known else ""):
            load_dataset(str(specimen.path))
        out = tmp_path / "out.pt"
        assert quantize_main([str(model), str(out), "--dataset", str(specimen.path)]) == 2
        assert not out.exists()
    assert not marker.exists()


def test_hostile_job_specs_exit_2(corpus: list[Specimen], tmp_path: Path) -> None:
    rows = []
    for specimen in cli_specimens(corpus, "jobspec"):
        result = run_mcaas(["run", str(specimen.path), "--artifacts", str(tmp_path / "ws")])
        assert result.exit_code == 2, f"{specimen.name}: {result.exception!r} {result.output}"
        # An error echoing a multi-megabyte input is a log flood of its own.
        assert len(result.output) < 5000, f"{specimen.name}: {len(result.output)} chars"
        rows.append({"name": specimen.name, "what": specimen.what, "exit": result.exit_code})
    _dump("hostile_cli_jobspecs.json", rows)


def _dump(name: str, rows: list[dict[str, Any]]) -> None:
    out = os.environ.get("MCAAS_RELIABILITY_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(json.dumps(rows, indent=2))
