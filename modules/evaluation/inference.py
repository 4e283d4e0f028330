"""One way to run any stored model: torch, scikit-learn or ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modules.core.artifact import ModelArtifact
from modules.errors import IncompatibleError


@dataclass
class Predictor:
    """Scores (class probabilities or logits, 2-D) and labels for a batch of flat features."""

    framework: str
    scores: Callable[[np.ndarray], np.ndarray]
    n_features: int | None

    def labels(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.scores(x)).argmax(axis=1)

    def check_features(self, x: np.ndarray) -> None:
        if self.n_features is not None and x.shape[1] != self.n_features:
            raise IncompatibleError(
                f"model expects {self.n_features} input features, dataset has {x.shape[1]}"
            )


def _torch_predictor(artifact: ModelArtifact) -> Predictor:
    import torch

    module = artifact.obj
    module.eval()

    def scores(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return torch.softmax(out.float(), dim=1).numpy()

    return Predictor("torch", scores, artifact.meta.get("in_features"))


def _sklearn_predictor(artifact: ModelArtifact) -> Predictor:
    est = artifact.obj
    n_features = getattr(est, "n_features_in_", None)
    if hasattr(est, "predict_proba"):
        return Predictor("sklearn", est.predict_proba, n_features)
    classes = np.asarray(est.classes_)

    def one_hot(x: np.ndarray) -> np.ndarray:
        pred = est.predict(x)
        return (pred[:, None] == classes[None, :]).astype(np.float32)

    return Predictor("sklearn", one_hot, n_features)


def ort_session(model_bytes: bytes, *, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _onnx_predictor(artifact: ModelArtifact) -> Predictor:
    session = ort_session(artifact.obj.SerializeToString())
    inp = session.get_inputs()[0]
    dtype = np.float64 if "double" in inp.type else np.float32
    width = inp.shape[1] if len(inp.shape) == 2 and isinstance(inp.shape[1], int) else None
    outputs = session.get_outputs()
    # skl2onnx classifiers emit [label, probabilities]; torch exports emit logits.
    score_idx = next(
        (i for i, o in enumerate(outputs) if "float" in o.type or "double" in o.type), 0
    )
    is_logits = artifact.meta.get("source_framework") == "torch"

    def scores(x: np.ndarray) -> np.ndarray:
        out = np.asarray(session.run(None, {inp.name: x.astype(dtype, copy=False)})[score_idx])
        if is_logits:
            out = out - out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
        return out

    return Predictor("onnx", scores, width)


def make_predictor(artifact: ModelArtifact) -> Predictor:
    """A Predictor for any supported artifact."""
    return {
        "torch": _torch_predictor,
        "sklearn": _sklearn_predictor,
        "onnx": _onnx_predictor,
    }[artifact.framework](artifact)
