"""run_step: the one place that loads a step's input, calls it, saves its output and logs it.

The CLI scripts, the Celery task, the ECS entrypoint and the in-process runner all
call this. Output keys are a pure function of (user, profile, job, index, step), and
the record is appended last with a conditional put, so running a step twice writes
the same objects and one record: that is what makes worker redelivery safe.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modules.core.artifact import ModelArtifact
from modules.core.jobspec import JobSpec
from modules.core.records import StepRecord
from modules.core.registry import get_step
from modules.core.step import (
    ProgressReporter,
    StepContext,
    StepOutput,
    cancellable,
    reporting_progress,
)
from modules.core.versions import library_versions
from modules.errors import BadInputError, IncompatibleError, McaasError
from modules.storage import keys
from modules.storage.artifacts import ArtifactStore
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import load_model, save_model
from modules.storage.steplog import StepLog

UPLOAD_THREADS = 8
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PipelineOrderError(McaasError):
    """A step was asked to run before the step it depends on has a record."""

    code = "order"


def step_prefix(job: JobSpec, index: int) -> str:
    """Where step `index` of `job` writes: users/{user}/{profile}/{job}/{i}-{step}/."""
    name = job.steps[index].name
    return keys.step_prefix(
        user_id=job.user_id, profile=job.profile_name, job_id=job.job_id, index=index, step=name
    )


def to_jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy scalars and arrays become Python ones, NaN becomes None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def put_all(store: ArtifactStore, objects: dict[str, bytes]) -> None:
    """Store every object, several at a time (each put is a round trip to S3); the first
    error is raised once all have finished, so none is left half-attempted unseen."""
    if len(objects) <= 1:
        for key, data in objects.items():
            store.put_bytes(key, data)
        return
    with ThreadPoolExecutor(max_workers=min(UPLOAD_THREADS, len(objects))) as pool:
        futures = [pool.submit(store.put_bytes, key, data) for key, data in objects.items()]
    for future in futures:
        future.result()


def load_stored_model(
    store: ArtifactStore, key: str, *, trust_pickle: bool = False
) -> ModelArtifact:
    """Load a model artifact from the store through the safe loaders."""
    return _load_model_bytes(store.get_bytes(key), key, trust_pickle=trust_pickle)


def _load_model_bytes(blob: bytes, key: str, *, trust_pickle: bool) -> ModelArtifact:
    try:
        return load_model(blob, filename=key, trust_pickle=trust_pickle)
    except BadInputError as exc:
        if key in str(exc):
            raise
        raise type(exc)(f"model {key}: {exc}") from None


class StepGuard(Protocol):
    """The one hook into run_step, for a caller that begins the step while its body runs
    (the engine's steps in a row): nothing is stored unless `confirm` returns."""

    def confirm(self) -> None:
        """Called after the body, before anything is stored; raise to store nothing."""
        ...

    def cancelled(self) -> bool:
        """What the body's check_cancelled() asks: true once the result is not wanted."""
        ...


def _input_key(job: JobSpec, index: int, previous: StepRecord | None) -> str | None:
    if index == 0:
        return job.model
    if previous is None:
        raise PipelineOrderError(
            f"job {job.job_id}: step {index} ({job.steps[index].name}) needs the record of "
            f"step {index - 1} ({job.steps[index - 1].name}), which has not run"
        )
    if previous.rejected:
        raise PipelineOrderError(
            f"job {job.job_id}: {previous.rejection_reason}; later steps do not run"
        )
    return previous.output_key or None


def _load_input(
    store: ArtifactStore, key: str | None, *, trust_pickle: bool
) -> tuple[ModelArtifact | None, int | None]:
    """The input model and its size in bytes (one download gives both), or (None, None)."""
    if not key:
        return None, None
    blob = store.get_bytes(key)
    return _load_model_bytes(blob, key, trust_pickle=trust_pickle), len(blob)


def _outputs(
    job: JobSpec, index: int, output: StepOutput
) -> tuple[dict[str, bytes], str | None, dict[str, str]]:
    """The objects to store (key -> bytes), the output model's key, and the files' keys."""
    name = job.steps[index].name
    prefix = step_prefix(job, index)
    uploads: dict[str, bytes] = {}
    model_key: str | None = None
    if output.model is not None:
        model_key = f"{prefix}model{output.model.suffix}"
        uploads[model_key] = save_model(output.model)
    file_keys: dict[str, str] = {}
    for file_name, content in sorted(output.files.items()):
        if not _FILE_NAME.match(file_name):
            raise BadInputError(f"step {name!r} produced a file with a bad name: {file_name!r}")
        file_keys[file_name] = f"{prefix}{file_name}"
        if file_keys[file_name] in uploads:
            raise BadInputError(f"step {name!r} produced a file named like its model: {file_name}")
        uploads[file_keys[file_name]] = content
    return uploads, model_key, file_keys


def run_step(
    job: JobSpec,
    index: int,
    *,
    store: ArtifactStore,
    log: StepLog,
    trust_pickle: bool = False,
    guard: StepGuard | None = None,
    progress: ProgressReporter | None = None,
) -> StepRecord:
    """Run step `index` of `job` once; a second call returns the first call's record.

    With a `guard`, its confirm() runs after the body and before anything is stored (it is
    not called when the step had already run), and its cancelled() is what the body's
    check_cancelled() asks (modules/core/step.py). `progress` hears what the body tells
    report_progress().
    """
    if not 0 <= index < len(job.steps):
        raise BadInputError(f"job {job.job_id} has {len(job.steps)} steps; no step {index}")
    # One query serves the idempotency check, the input and the history: each log read
    # is a DynamoDB round trip in the service.
    earlier = {r.index: r for r in log.records(job.job_id)}
    if index in earlier:
        return earlier[index]

    call = job.steps[index]
    step = get_step(call.name)
    params = step.params.model_validate(call.params)
    input_key = _input_key(job, index, earlier.get(index - 1))
    model, input_size = _load_input(store, input_key, trust_pickle=trust_pickle)
    kind = model.framework if model is not None else "none"
    if kind not in step.accepts:
        raise IncompatibleError(
            f"step {call.name!r} accepts {sorted(step.accepts)} models, got {kind!r}"
        )
    data = load_dataset(job.dataset, seed=job.seed)
    if kind == "sklearn":
        data = data.flat()  # estimators read flat rows; images keep their shape for the rest

    started_at = datetime.now(UTC).isoformat()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mcaas-step-") as workdir:
        ctx = StepContext(
            job_id=job.job_id,
            user_id=job.user_id,
            profile=job.profile_obj,
            seed=job.seed,
            repeats=job.repeats,
            step_index=index,
            step_name=call.name,
            workdir=Path(workdir),
            # As plain dicts, so a step reads its predecessors without the records module.
            history=[earlier[i].model_dump(mode="json") for i in sorted(earlier) if i < index],
            load_model=lambda key: load_stored_model(store, key, trust_pickle=trust_pickle),
            read_bytes=store.get_bytes,
        )
        with (
            cancellable(guard.cancelled if guard is not None else None),
            reporting_progress(progress),
        ):
            output: StepOutput = step.fn(model, data, params, ctx)
    duration = time.perf_counter() - t0
    if guard is not None:
        guard.confirm()

    uploads, model_key, file_keys = _outputs(job, index, output)
    put_all(store, uploads)
    record = StepRecord.model_validate(
        to_jsonable(
            {
                "job_id": job.job_id,
                "user_id": job.user_id,
                "profile": job.profile_name,
                "step": call.name,
                "index": index,
                "n_steps": len(job.steps),
                "params": params.model_dump(mode="json"),
                "input_key": input_key,
                "input_size": input_size,
                "input_framework": kind,
                "output_key": model_key or input_key,
                "output_size": len(uploads[model_key]) if model_key else input_size,
                "output_framework": (
                    output.model.framework
                    if output.model is not None
                    else (kind if model is not None else None)
                ),
                "files": file_keys,
                "metrics": output.metrics,
                "verdict": output.verdict.as_dict() if output.verdict else None,
                "seed": job.seed,
                "repeats": job.repeats,
                "dataset": data.describe(),
                "versions": library_versions(),
                "started_at": started_at,
                "finished_at": datetime.now(UTC).isoformat(),
                "duration_s": duration,
            }
        )
    )
    if log.append(record):
        return record
    # Whatever was stored first is the truth (a redelivered duplicate may have raced us).
    found = log.get(job.job_id, index)
    return record if found is None else found
