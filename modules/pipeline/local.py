"""The embedded default: one directory with the artifact store, step log and jobs."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.core.jobspec import DEFAULT_PROFILE, JobSpec, parse_job_spec
from modules.core.records import StepRecord
from modules.errors import BadInputError
from modules.pipeline.run import run_step
from modules.pipeline.runner import PipelineResult, ProgressFn, run_pipeline
from modules.storage.artifacts import LocalStore
from modules.storage.jobs import SqliteJobStore
from modules.storage.keys import model_key
from modules.storage.model_formats import load_model_file, save_model
from modules.storage.steplog import SqliteStepLog


@dataclass
class LocalWorkspace:
    """store/ for artifacts, steps.sqlite (and its steps.csv export), jobs.sqlite for jobs."""

    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = LocalStore(self.root / "store")
        self.log = SqliteStepLog(self.root / "steps.sqlite", csv_export=self.root / "steps.csv")
        self.jobs = SqliteJobStore(self.root / "jobs.sqlite")

    def import_model(
        self, path: Path, *, user_id: str, trust_pickle: bool = False, arch: Any = None
    ) -> str:
        """Validate a local model file with the safe loaders and store it; returns its key.

        `arch` names the architecture of a bare state_dict file (a name or a JSON arch).
        """
        artifact = load_model_file(path, trust_pickle=trust_pickle, arch=arch)
        blob = save_model(artifact)  # re-serialized: the store only ever holds safe formats
        digest = hashlib.sha256(blob).hexdigest()[:16]
        key = model_key(user_id, digest, artifact.suffix)
        self.store.put_bytes(key, blob)
        return key

    def run(
        self, spec: JobSpec, *, trust_pickle: bool = False, progress: ProgressFn | None = None
    ) -> PipelineResult:
        return run_pipeline(
            spec,
            store=self.store,
            log=self.log,
            jobs=self.jobs,
            trust_pickle=trust_pickle,
            progress=progress,
        )

    def path_of(self, key: str) -> Path:
        return self.store.root / key


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SUFFIX_OF = {"torch": ".pt", "sklearn": ".skops", "onnx": ".onnx"}


def run_single_step(
    step: str,
    params: dict[str, Any],
    *,
    input_path: Path | None,
    output_path: Path | None,
    input_arch: Any = None,
    dataset: str = "digits",
    profile: str = DEFAULT_PROFILE,
    seed: int = 0,
    trust_pickle: bool = False,
    workspace: Path | None = None,
) -> StepRecord:
    """Run one registered step on a local file, through run_step; returns its record.

    The output model is written to `output_path` only after the step succeeded, and
    atomically, so a failure leaves nothing behind.
    """
    if output_path is not None and output_path.is_dir():
        raise BadInputError(f"output path {output_path} is a directory")
    with tempfile.TemporaryDirectory(prefix="mcaas-cli-") as tmp:
        ws = LocalWorkspace(workspace or Path(tmp))
        model_key = None
        if input_path is not None:
            model_key = ws.import_model(
                input_path, user_id="local", trust_pickle=trust_pickle, arch=input_arch
            )
        spec = parse_job_spec(
            {
                "model": model_key,
                "dataset": dataset,
                "profile": profile,
                "seed": seed,
                "steps": [{"name": step, "params": params}],
            }
        )
        record = run_step(spec, 0, store=ws.store, log=ws.log, trust_pickle=trust_pickle)
        if output_path is not None:
            framework = record.output_framework
            if record.output_key is None:
                raise BadInputError(f"step {step!r} produced no model to write")
            # The stored key's suffix is the format written (a torch model may be .pt or .pt2).
            expected = Path(record.output_key).suffix or SUFFIX_OF.get(str(framework))
            if expected and output_path.suffix != expected:
                raise BadInputError(
                    f"output {output_path.name}: a {framework} model is saved as *{expected}"
                )
            write_atomic(output_path, ws.store.get_bytes(record.output_key))
        return record
