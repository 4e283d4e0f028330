"""Embedded services (local store, CSV log, SQLite jobs) and toy steps that count their calls."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from sklearn.neighbors import KNeighborsClassifier

from modules.core.artifact import ModelArtifact
from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord
from modules.core.registry import register_step, unregister_step
from modules.core.step import StepOutput, Verdict
from modules.pipeline.settings import Services, Settings, build_services

CALLS: Counter[str] = Counter()
# Errors the toy `t_flaky` step raises, one per call, before it succeeds.
FLAKY_ERRORS: list[BaseException] = []


class ToyParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    passed: bool = Field(default=True, description="Whether the gate passes.")


@pytest.fixture(autouse=True)
def toy_steps():
    @register_step("w_refit", params=ToyParams, accepts={"sklearn"})
    def refit(model, data, params, ctx):
        """Refit a 3-NN classifier."""
        CALLS["w_refit"] += 1
        est = KNeighborsClassifier(n_neighbors=3).fit(data.X_train, data.y_train)
        return StepOutput(model=ModelArtifact("sklearn", est), metrics={"n": 1})

    @register_step("w_gate", params=ToyParams, accepts={"sklearn"}, gate=True)
    def gate(model, data, params, ctx):
        """Pass or fail as told."""
        CALLS["w_gate"] += 1
        return StepOutput(verdict=Verdict(params.passed, f"told to pass={params.passed}"))

    @register_step("w_flaky", params=ToyParams, accepts={"sklearn"})
    def flaky(model, data, params, ctx):
        """Raise the queued errors first."""
        CALLS["w_flaky"] += 1
        if FLAKY_ERRORS:
            raise FLAKY_ERRORS.pop(0)
        return StepOutput(metrics={"ok": True})

    CALLS.clear()
    FLAKY_ERRORS.clear()
    yield
    for name in ("w_refit", "w_gate", "w_flaky"):
        unregister_step(name)


@pytest.fixture
def calls() -> Counter[str]:
    """How often each toy step body ran."""
    return CALLS


@pytest.fixture
def flaky_errors() -> list[BaseException]:
    """Errors `w_flaky` raises, one per call, before it succeeds."""
    return FLAKY_ERRORS


def local_settings(root: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "store_url": str(root / "store"),
        "jobs_db": root / "jobs.sqlite",
        "csv_log": root / "steps.csv",
    }
    values.update(over)
    return Settings(**values)


@pytest.fixture
def settings_for(tmp_path: Path):
    """Settings for the embedded stores under tmp_path, with overrides."""

    def make(**over: Any) -> Settings:
        return local_settings(tmp_path, **over)

    return make


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(local_settings(tmp_path))


@pytest.fixture
def make_job(services: Services):
    """Store a job with the given steps (first: train knn) and return its id."""

    def make(*steps: dict[str, Any], job_id: str = "job1") -> str:
        spec = parse_job_spec(
            {
                "job_id": job_id,
                "user_id": "alice",
                "steps": [{"name": "train", "params": {"model": "knn"}}, *steps],
            }
        )
        assert services.jobs.create(JobRecord.new(spec))
        return job_id

    return make
