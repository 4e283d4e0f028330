"""One way to run any stored model: torch, scikit-learn or ONNX Runtime (`OrtRunner`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from modules.core.artifact import ModelArtifact
from modules.errors import IncompatibleError
from modules.storage.inputs import TensorSpec, n_rows, onnx_inputs, onnx_outputs, take_rows

# Rows per ONNX Runtime call when a graph's batch axis is free: bounds activation memory.
RUN_CHUNK_ROWS = 512


@dataclass
class Predictor:
    """Scores (class probabilities or logits, 2-D) and labels for a batch of a dataset's X.

    X is what the dataset holds once shaped for the model (`dataset_for_model`): flat
    features, images, or a structured array with one field per named input.
    """

    framework: str
    scores: Callable[[np.ndarray], np.ndarray]
    n_features: int | None

    def labels(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.scores(x)).argmax(axis=1)

    def check_features(self, x: np.ndarray) -> None:
        if x.dtype.names or x.ndim != 2:
            return  # shaped inputs are checked against the model's specs (dataset_for_model)
        if self.n_features is not None and x.shape[1] != self.n_features:
            raise IncompatibleError(
                f"model expects {self.n_features} input features, dataset has {x.shape[1]}"
            )


def _torch_predictor(artifact: ModelArtifact) -> Predictor:
    import torch

    from modules.training.finetune import eval_mode, forward

    module = eval_mode(artifact.obj)

    def scores(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = forward(module, x)
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


# Uploaded graphs are untrusted: every session allocates from one CPU arena capped at this
# size, so a run that asks for more fails with ORT's allocation error (an IncompatibleError
# from OrtRunner.run) instead of growing the process. modules.storage.onnx_bounds refuses
# what static shapes reveal; this bounds the rest. The arena keeps what it has grown to
# (at most the cap) for the next session rather than returning it after each run, which
# would add page faults to every timed run.
ORT_ARENA_MAX_BYTES = 4 * 1024**3
_arena_lock = threading.Lock()
_arena_registered = False


def _register_capped_arena(ort: Any) -> None:
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        memory = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # (max_mem, extend strategy 1 = grow by what is requested, default chunk sizes)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(ORT_ARENA_MAX_BYTES, 1, -1, -1))
        _arena_registered = True


def ort_session(model_bytes: bytes, *, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session with `threads` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    _register_capped_arena(ort)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


@dataclass
class OrtRunner:
    """An ONNX Runtime session over any number of rows: chunked runs, outputs concatenated."""

    session: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # A graph exported with a fixed batch size is fed exactly that many rows per run.
    fixed_batch: int | None
    # run_matrix feeds a flat (batch, n_features) matrix to this input, cast to this type.
    matrix_input: str = ""
    matrix_dtype: type[np.floating[Any]] = np.float32

    @classmethod
    def of(cls, proto: Any, *, threads: int | None) -> OrtRunner:
        """A session for `proto` with `threads` intra-op threads (None: ORT's default)."""
        specs = onnx_inputs(proto)
        fixed = [s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)]
        fixed_batch = min((d for d in fixed if d > 0), default=None)
        session = ort_session(proto.SerializeToString(), threads=threads)
        first = session.get_inputs()[0]
        dtype = np.float64 if "double" in first.type else np.float32
        return cls(session, specs, onnx_outputs(proto), fixed_batch, first.name, dtype)

    @property
    def chunk(self) -> int:
        return self.fixed_batch or RUN_CHUNK_ROWS

    def run(
        self, feeds: Mapping[str, np.ndarray], *, chunk: int | None = None
    ) -> dict[str, np.ndarray]:
        """name -> output over all rows (outputs without a row axis are left out).

        chunk: rows per session call (default: the graph's fixed batch, else RUN_CHUNK_ROWS);
        a graph whose outputs depend on what else is in the batch (dynamic int8) answers
        differently at different chunk sizes.
        """
        total = n_rows(feeds)
        step = chunk or self.chunk
        try:
            parts = [
                self.session.run(None, take_rows(feeds, slice(start, start + step)))
                for start in range(0, total, step)
            ]
        except Exception as exc:  # ORT's own error types (Fail, InvalidArgument, ...)
            text = " ".join(str(exc).split())[:400]
            raise IncompatibleError(
                f"ONNX Runtime could not run the model on these inputs: {text}"
            ) from exc
        out = {}
        for i, spec in enumerate(self.outputs):
            pieces = [np.asarray(p[i]) for p in parts]
            if all(p.ndim >= 1 for p in pieces):
                out[spec.name] = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        return out

    def run_matrix(self, x: np.ndarray) -> list[Any]:
        """Every output for a dataset's X: a single array to the first input, in its float
        type; a structured array's fields to the inputs of the same names, in their dtypes."""
        if x.dtype.names:
            feed = {
                s.name: np.ascontiguousarray(x[s.name], dtype=s.dtype or None) for s in self.inputs
            }
        else:
            dtype = self.matrix_dtype if x.dtype.kind == "f" else self._first_dtype
            feed = {self.matrix_input: x.astype(dtype, copy=False)}
        try:
            return cast(list[Any], self.session.run(None, feed))
        except Exception as exc:  # ORT's own error types (Fail, InvalidArgument, ...)
            text = " ".join(str(exc).split())[:400]
            shapes = ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in feed.items())
            raise IncompatibleError(
                f"ONNX Runtime could not run the model on {shapes} (inputs: "
                f"{', '.join(s.describe() for s in self.inputs)}): {text}"
            ) from exc

    @property
    def _first_dtype(self) -> Any:
        first = next((s for s in self.inputs if s.name == self.matrix_input), None)
        return np.dtype(first.dtype) if first is not None and first.dtype else self.matrix_dtype

    def batch_sizes(self, wanted: int) -> list[int]:
        """Batch sizes to time: 1 and `wanted`, or the graph's fixed batch size."""
        return [self.fixed_batch] if self.fixed_batch else sorted({1, wanted})


def feed_batch(feeds: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`size` rows of every input, cycling when there are fewer."""
    return take_rows(feeds, np.arange(size) % n_rows(feeds))


def _onnx_predictor(artifact: ModelArtifact) -> Predictor:
    runner = OrtRunner.of(artifact.obj, threads=None)
    session = runner.session
    inp = session.get_inputs()[0]
    width = inp.shape[1] if len(inp.shape) == 2 and isinstance(inp.shape[1], int) else None
    outputs = session.get_outputs()
    # skl2onnx classifiers emit [label, probabilities]; torch exports emit logits.
    score_idx = next(
        (i for i, o in enumerate(outputs) if "float" in o.type or "double" in o.type), 0
    )
    is_logits = artifact.meta.get("source_framework") == "torch"

    def scores(x: np.ndarray) -> np.ndarray:
        out = np.asarray(runner.run_matrix(x)[score_idx])
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
