"""Tiny models and a step context for calling deployment steps directly."""

from pathlib import Path

import pytest

from modules.core.profiles import get_profile
from modules.core.step import StepContext
from modules.storage.datasets import load_dataset
from modules.training.train import TrainParams, train_baseline

# A small MLP keeps every export, ONNX session and pipeline in these tests fast.
SMALL_MLP = {"model": "mlp", "arch": {"name": "mlp", "hidden": [32]}, "epochs": 8}


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def small_mlp(digits):
    artifact, _ = train_baseline(TrainParams(**SMALL_MLP), digits, seed=0)
    return artifact


@pytest.fixture(scope="session")
def small_knn(digits):
    artifact, _ = train_baseline(TrainParams(model="knn"), digits, seed=0)
    return artifact


@pytest.fixture
def ctx_factory(tmp_path: Path):
    def build(*, history=(), models=None, profile="edge-8mb"):
        models = models or {}
        return StepContext(
            job_id="t-job",
            user_id="tester",
            profile=get_profile(profile),
            seed=0,
            repeats=1,
            step_index=len(history),
            step_name="under_test",
            workdir=tmp_path,
            history=list(history),
            load_model=models.__getitem__,
        )

    return build
