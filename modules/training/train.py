"""The `train` step: baselines from a dataset, so a job needs no upload."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError
from modules.storage.datasets import Dataset
from modules.training.fields import TrainingFields

TORCH_KINDS = ("mlp", "cnn", "resnet")
SKLEARN_KINDS = ("knn", "rf", "logreg")

DEFAULT_ARCH: dict[str, dict[str, Any]] = {
    "mlp": {"name": "mlp", "hidden": [256, 128]},
    "cnn": {"name": "cnn", "channels": [16, 32]},
    "resnet": {"name": "resnet", "widths": [16, 32], "blocks": [1, 1]},
}


class TrainParams(TrainingFields):
    """Params of the `train` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Literal["mlp", "cnn", "resnet", "knn", "rf", "logreg"] = Field(
        default="mlp", description="Which baseline to train."
    )
    arch: dict[str, Any] | None = Field(
        default=None,
        description="Torch zoo arch overriding the default, e.g. {'name': 'mlp', 'hidden': [64]}.",
    )
    epochs: int = Field(default=30, ge=1, le=1000, description="Torch training epochs.")
    n_neighbors: int = Field(default=5, ge=1, le=1000, description="KNN neighbours.")
    n_estimators: int = Field(default=100, ge=1, le=5000, description="Random-forest trees.")
    max_iter: int = Field(
        default=2000, ge=10, le=100_000, description="LogisticRegression max_iter."
    )


def train_torch(
    params: TrainParams, data: Dataset, *, seed: int
) -> tuple[ModelArtifact, dict[str, Any]]:
    """Build a zoo model for the dataset's shape and fit it."""
    from modules.storage.architectures import build_model, complete_arch
    from modules.training.finetune import accuracy, fit, seed_everything

    arch = dict(params.arch or DEFAULT_ARCH[params.model])
    if arch.get("name") not in {params.model, "sequential"}:
        raise BadInputError(
            f"train: arch name {arch.get('name')!r} does not match model {params.model!r}"
        )
    arch = complete_arch(
        arch,
        in_features=data.n_features,
        num_classes=data.n_classes,
        image_shape=data.image_shape,
    )
    seed_everything(seed)
    module = build_model(arch)
    history = fit(
        module,
        data.X_train,
        data.y_train,
        epochs=params.epochs,
        lr=params.lr,
        batch_size=params.batch_size,
        seed=seed,
    )
    meta = {"in_features": data.n_features, "num_classes": data.n_classes, "zoo_arch": arch}
    metrics = {
        "train_accuracy": accuracy(module, data.X_train, data.y_train),
        "test_accuracy": accuracy(module, data.X_test, data.y_test),
        "train_time_s": history["train_time_s"],
        "final_loss": history["final_loss"],
        "arch": arch,
    }
    return ModelArtifact("torch", module, meta), metrics


def train_sklearn(
    params: TrainParams, data: Dataset, *, seed: int
) -> tuple[ModelArtifact, dict[str, Any]]:
    """Fit a scikit-learn baseline."""
    import time

    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    estimator: Any
    if params.model == "knn":
        estimator = KNeighborsClassifier(n_neighbors=params.n_neighbors)
    elif params.model == "rf":
        estimator = RandomForestClassifier(n_estimators=params.n_estimators, random_state=seed)
    else:
        estimator = LogisticRegression(max_iter=params.max_iter)
    start = time.perf_counter()
    estimator.fit(data.X_train, data.y_train)
    elapsed = time.perf_counter() - start
    metrics = {
        "train_accuracy": float(estimator.score(data.X_train, data.y_train)),
        "test_accuracy": float(estimator.score(data.X_test, data.y_test)),
        "train_time_s": elapsed,
        "estimator": type(estimator).__name__,
    }
    meta = {"in_features": data.n_features, "num_classes": data.n_classes}
    return ModelArtifact("sklearn", estimator, meta), metrics


def train_baseline(
    params: TrainParams, data: Dataset, *, seed: int
) -> tuple[ModelArtifact, dict[str, Any]]:
    """A baseline of the requested kind, trained on the dataset's train split."""
    # Zoo models and scikit-learn estimators read flat rows (their meta records in_features);
    # image datasets keep their shape for models that declare theirs.
    data = data.flat()
    if params.model in TORCH_KINDS:
        return train_torch(params, data, seed=seed)
    return train_sklearn(params, data, seed=seed)


@register_step("train", params=TrainParams, accepts={"none"})
def train(
    model: ModelArtifact | None, data: Dataset, params: TrainParams, ctx: StepContext
) -> StepOutput:
    """Train a baseline (torch mlp/cnn/resnet or sklearn knn/rf/logreg) on the dataset."""
    if model is not None:
        raise BadInputError("train: the job already has an input model; drop `model` or the step")
    artifact, metrics = train_baseline(params, data, seed=ctx.seed)
    return StepOutput(model=artifact, metrics=metrics)
