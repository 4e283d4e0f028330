"""The `onnx_parity` gate: the ONNX model must predict what the native model predicts.

Its input is the ONNX model; the reference is the newest earlier model of this job in the
framework the ONNX graph came from (`meta["source_framework"]`, else the newest torch or
scikit-learn one). Both predict the whole test split:

* label agreement = fraction of samples whose argmax labels are equal;
* max |prob diff| = the largest absolute difference between the two probability
  matrices (softmax of the logits for torch graphs).

The gate passes only when agreement >= min_agreement and max |prob diff| <= max_prob_diff.
It writes deployment_report.json: both numbers, the thresholds, the first mismatched test
indices, native vs ONNX Runtime latency (median and 95% CI, both on `threads` threads),
the opsets and the library versions. A failed gate ends the job REJECTED with the reason;
it never raises.

Bring-your-own ONNX graphs (no native model in the job) are compared with the earlier ONNX
model of the job instead, e.g. the fp32 upload before onnx_quantize, on an inputs file
(`inputs`: one array per named graph input) or, for a standard (batch, n_features) graph,
the test split. The comparison depends on the output kind, declared (`output_kind`) or
inferred from the graph and its outputs:

* labels: agreement and max |prob diff|, as above;
* embedding: per-row cosine similarity (min and mean) and the max absolute error;
* regression: max absolute error, max relative error (|error| / max |reference| of the
  output) and R² of the outputs against the reference (mean over output columns).

The report names the worst rows and, for graphs with several outputs, the worst output.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict
from modules.errors import BadInputError, IncompatibleError
from modules.evaluation.inference import make_predictor
from modules.evaluation.measure import batch_of, time_batches
from modules.storage.datasets import Dataset
from modules.storage.inputs import (
    TensorSpec,
    check_inputs_id,
    dataset_feeds,
    load_stored_inputs,
    n_rows,
    onnx_inputs,
    onnx_outputs,
    prepare_feeds,
    take_rows,
)

NATIVE_FRAMEWORKS = ("torch", "sklearn")
OutputKind = Literal["auto", "labels", "embedding", "regression"]
# Rows per ONNX Runtime call when a graph's batch axis is free: bounds activation memory.
RUN_CHUNK_ROWS = 512


class GateThresholds(BaseModel):
    """The parity thresholds shared by the onnx_parity gate and onnx_quantize's search."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output_kind: OutputKind = Field(
        default="auto",
        description=(
            "How outputs are compared: labels (agreement and max |prob diff|), embedding "
            "(cosine per row), regression (abs/rel error and R²). auto: labels for exported "
            "classifiers, probability rows or integer label outputs; regression for one value "
            "per row; embedding otherwise."
        ),
    )
    min_agreement: float = Field(
        default=0.98, ge=0, le=1, description="Minimum label agreement on the test split (0..1)."
    )
    max_prob_diff: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description=(
            "Maximum absolute probability difference. 0.05 admits int8 graphs; an unquantized "
            "float32 export differs by about 1e-6, so 1e-4 is a strict setting for those."
        ),
    )
    min_cosine: float = Field(
        default=0.99,
        ge=-1,
        le=1,
        description="embedding: minimum cosine similarity of any row to the reference's row.",
    )
    min_mean_cosine: float = Field(
        default=0.995,
        ge=-1,
        le=1,
        description="embedding: minimum mean cosine similarity over the rows.",
    )
    max_abs_error: float | None = Field(
        default=None,
        ge=0,
        le=1e12,
        description="embedding and regression: maximum absolute error of any element; none = "
        "reported, not gated.",
    )
    max_rel_error: float | None = Field(
        default=0.05,
        ge=0,
        le=1e6,
        description="regression: maximum |error| / max |reference| of an output; none = "
        "reported, not gated.",
    )
    min_r2: float = Field(
        default=0.99,
        ge=-1e6,
        le=1,
        description="regression: minimum R² of each output against the reference (mean over "
        "its columns).",
    )


def inputs_param(value: str | None) -> str | None:
    """Validator body for an `inputs` param: None, or an id shaped like a server-made one."""
    if value is None:
        return None
    try:
        return check_inputs_id(value)
    except BadInputError as exc:
        raise ValueError(str(exc)) from None


class ParityParams(GateThresholds):
    """Params of the `onnx_parity` gate."""

    inputs: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "Id of an inputs file (POST /v1/inputs): a .npz with one array per graph input, "
            "for graphs a dataset cannot feed; none = the dataset's test split."
        ),
    )
    worst_rows: int = Field(
        default=10, ge=0, le=1000, description="How many worst rows the report names."
    )
    mismatch_sample: int = Field(
        default=20, ge=0, le=1000, description="How many mismatched test indices to report."
    )
    latency_batch: int = Field(
        default=64, ge=1, le=65_536, description="Second batch size timed (batch 1 always is)."
    )
    warmup: int = Field(default=3, ge=0, le=1000, description="Untimed runs before timing.")
    runs: int = Field(default=20, ge=2, le=10_000, description="Timed runs per batch size.")
    threads: int | None = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Threads for both sides of the latency comparison: 1 compares like with like, "
            "as on one edge core, and stays stable on a shared machine; none = each "
            "library's default."
        ),
    )

    @field_validator("inputs")
    @classmethod
    def _id_shape(cls, value: str | None) -> str | None:
        return inputs_param(value)


def compare_predictions(
    native: np.ndarray, onnx: np.ndarray, *, mismatch_sample: int = 20, compare_probs: bool = True
) -> dict[str, Any]:
    """Label agreement and max |prob diff| of two score matrices over the same samples."""
    if native.shape[0] != onnx.shape[0]:
        raise IncompatibleError(
            f"native and ONNX predicted {native.shape[0]} and {onnx.shape[0]} samples"
        )
    labels_native, labels_onnx = native.argmax(axis=1), onnx.argmax(axis=1)
    mismatched = np.flatnonzero(labels_native != labels_onnx)
    out: dict[str, Any] = {
        "n_samples": int(native.shape[0]),
        "agreement": float(1.0 - len(mismatched) / max(native.shape[0], 1)),
        "n_mismatched": len(mismatched),
        "mismatched_indices_sample": [int(i) for i in mismatched[:mismatch_sample]],
        "max_abs_prob_diff": None,
        "prob_diff_note": None,
    }
    if not compare_probs:
        out["prob_diff_note"] = "the native model has no probabilities; labels compared only"
    elif native.shape != onnx.shape:
        out["max_abs_prob_diff"] = float("inf")
        out["prob_diff_note"] = f"score shapes differ: native {native.shape}, ONNX {onnx.shape}"
    else:
        diff = np.abs(native.astype(np.float64) - onnx.astype(np.float64))
        out["max_abs_prob_diff"] = float(diff.max()) if diff.size else 0.0
    return out


def parity_verdict(result: dict[str, Any], params: GateThresholds) -> Verdict:
    """Pass only when agreement >= min and max |prob diff| <= max; the reason has the numbers."""
    agreement = result["agreement"]
    ok_labels = agreement >= params.min_agreement
    parts = [
        f"label agreement {agreement:.4f} {'>=' if ok_labels else '<'} min {params.min_agreement:g}"
        f" ({result['n_mismatched']} of {result['n_samples']} test samples differ)"
    ]
    diff = result["max_abs_prob_diff"]
    ok_probs = True
    if diff is None:
        parts.append(str(result["prob_diff_note"]))
    else:
        ok_probs = diff <= params.max_prob_diff
        parts.append(
            f"max |prob diff| {diff:.3g} {'<=' if ok_probs else '>'} max {params.max_prob_diff:g}"
        )
        if result.get("prob_diff_note"):
            parts.append(str(result["prob_diff_note"]))
    passed = ok_labels and ok_probs
    prefix = "ONNX parity passed: " if passed else "ONNX parity failed: "
    return Verdict(passed, prefix + "; ".join(parts))


# --- bring-your-own graphs: outputs compared by kind ---------------------------------------------


def _rows(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return arr.reshape(len(arr), -1)


def cosine_rows(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (one flattened sample) of two arrays of the same shape."""
    ref, out = _rows(reference), _rows(candidate)
    ref_norm, out_norm = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
    denom = ref_norm * out_norm
    cos = (ref * out).sum(axis=1) / np.where(denom > 0, denom, 1.0)
    cos[denom == 0] = 0.0
    cos[(ref_norm == 0) & (out_norm == 0)] = 1.0  # two zero rows are the same row
    return np.clip(cos, -1.0, 1.0)


def _worst_rows(
    order: np.ndarray, columns: dict[str, np.ndarray], *, k: int
) -> list[dict[str, Any]]:
    return [
        {"row": int(i), **{name: float(values[i]) for name, values in columns.items()}}
        for i in order[:k]
    ]


def embedding_metrics(
    reference: np.ndarray, candidate: np.ndarray, *, worst: int = 10
) -> dict[str, Any]:
    """min and mean cosine similarity per row, the max abs error, and the worst rows."""
    cos = cosine_rows(reference, candidate)
    row_err = np.abs(_rows(reference) - _rows(candidate)).max(axis=1)
    order = np.argsort(cos, kind="stable")
    return {
        "n_rows": len(cos),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_error": float(row_err.max()),
        "worst_rows": _worst_rows(order, {"cosine": cos, "max_abs_error": row_err}, k=worst),
    }


def r2_columns(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """R² of each output column of the candidate against the reference."""
    ref, out = _rows(reference), _rows(candidate)
    ss_res = ((ref - out) ** 2).sum(axis=0)
    ss_tot = ((ref - ref.mean(axis=0)) ** 2).sum(axis=0)
    r2 = 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0)
    # A constant reference column has no variance to explain: 1 if matched exactly, else 0
    # (scikit-learn's r2_score makes the same choice).
    return np.where(ss_tot > 0, r2, np.where(ss_res == 0, 1.0, 0.0))


def regression_metrics(
    reference: np.ndarray, candidate: np.ndarray, *, worst: int = 10
) -> dict[str, Any]:
    """Max abs and relative error, R² (mean over columns) and the worst rows."""
    ref, out = _rows(reference), _rows(candidate)
    err = np.abs(ref - out)
    peak, scale = float(err.max()), float(np.abs(ref).max())
    rel = peak / scale if scale > 0 else (0.0 if peak == 0 else float("inf"))
    r2 = r2_columns(ref, out)
    row_err = err.max(axis=1)
    order = np.argsort(-row_err, kind="stable")
    return {
        "n_rows": len(ref),
        "max_abs_error": peak,
        "mean_abs_error": float(err.mean()),
        "max_rel_error": rel,
        "r2": float(r2.mean()),
        "r2_worst_column": int(r2.argmin()),
        "worst_rows": _worst_rows(order, {"max_abs_error": row_err}, k=worst),
    }


def _are_probabilities(scores: np.ndarray) -> bool:
    return bool((scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))


def _softmax(scores: np.ndarray) -> np.ndarray:
    out = scores - scores.max(axis=1, keepdims=True)
    np.exp(out, out=out)
    return out / out.sum(axis=1, keepdims=True)


def labels_metrics(
    reference: np.ndarray, candidate: np.ndarray, *, worst: int = 10, mismatch_sample: int = 20
) -> dict[str, Any]:
    """Agreement and max |prob diff| (softmax first when the reference rows are logits)."""
    ref, out = _rows(reference), _rows(candidate)
    if not _are_probabilities(ref):
        ref, out = _softmax(ref), _softmax(out)
    result = compare_predictions(ref, out, mismatch_sample=mismatch_sample)
    result["worst_rows"] = label_worst_rows(ref, out, worst=worst)
    return result


def label_worst_rows(
    reference: np.ndarray, candidate: np.ndarray, *, worst: int = 10
) -> list[dict[str, Any]]:
    """Rows whose label flipped first, then those with the largest |prob diff|."""
    flipped = reference.argmax(axis=1) != candidate.argmax(axis=1)
    if reference.shape == candidate.shape:
        row_diff = np.abs(reference.astype(np.float64) - candidate).max(axis=1)
    else:  # scores of different widths: only the labels compare
        row_diff = np.zeros(len(reference))
    order = np.lexsort((-row_diff, ~flipped))
    return _worst_rows(
        order, {"label_flipped": flipped.astype(float), "max_abs_prob_diff": row_diff}, k=worst
    )


def infer_output_kind(
    meta: Mapping[str, Any], outputs: Mapping[str, np.ndarray]
) -> tuple[str, str]:
    """(kind, why) from the model's meta and the reference's outputs."""
    if meta.get("source_framework") in NATIVE_FRAMEWORKS or meta.get("num_classes"):
        return "labels", "an exported classifier"
    floats = [
        (name, np.asarray(v)) for name, v in outputs.items() if np.asarray(v).dtype.kind == "f"
    ]
    if not floats:
        raise IncompatibleError(
            f"the model has no float output to compare (outputs: {', '.join(outputs)})"
        )
    name, first = floats[0]
    rows = _rows(first)
    ints = [n for n, v in outputs.items() if np.asarray(v).dtype.kind in "iu"]
    if rows.shape[1] == 1:
        return "regression", f"output {name!r} has one value per row"
    if ints and first.ndim == 2:
        return "labels", f"integer output {ints[0]!r} beside the scores {name!r}"
    if first.ndim == 2 and _are_probabilities(rows):
        return "labels", f"the rows of {name!r} are probabilities"
    return "embedding", f"output {name!r} has {rows.shape[1]} values per row"


def resolve_kind(
    declared: str, meta: Mapping[str, Any], outputs: Mapping[str, np.ndarray]
) -> tuple[str, str]:
    """The declared kind, or the inferred one when `auto`."""
    if declared != "auto":
        return declared, "declared in the params"
    return infer_output_kind(meta, outputs)


_HEADLINE = {
    "embedding": ("min_cosine", min, ("mean_cosine", min), ("max_abs_error", max)),
    "regression": ("r2", min, ("max_rel_error", max), ("max_abs_error", max)),
}


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    kind: str,
    worst: int = 10,
    mismatch_sample: int = 20,
) -> dict[str, Any]:
    """Compare the float outputs of two runs over the same rows; the worst output leads.

    labels compares the first float output (the scores); embedding and regression compare
    every float output and report the worst one's numbers at the top level.
    """
    floats = [n for n, v in reference.items() if np.asarray(v).dtype.kind == "f"]
    if not floats:
        raise IncompatibleError(
            f"the reference has no float output to compare (outputs: {', '.join(reference)})"
        )
    for name in floats:
        if name not in candidate:
            raise IncompatibleError(
                f"the compared model has no output {name!r} (it has {', '.join(candidate)})"
            )
        if np.shape(candidate[name]) != np.shape(reference[name]):
            raise IncompatibleError(
                f"output {name!r}: reference shape {list(np.shape(reference[name]))}, compared "
                f"model {list(np.shape(candidate[name]))}"
            )
    if kind == "labels":
        name = floats[0]
        per = {
            name: labels_metrics(
                reference[name], candidate[name], worst=worst, mismatch_sample=mismatch_sample
            )
        }
        return {"kind": kind, **per[name], "worst_output": name, "outputs": per}
    if kind not in _HEADLINE:
        raise BadInputError(f"unknown output kind {kind!r}; use labels, embedding or regression")
    metric_fn = embedding_metrics if kind == "embedding" else regression_metrics
    per = {n: metric_fn(reference[n], candidate[n], worst=worst) for n in floats}
    lead, _, *rest = _HEADLINE[kind]
    worst_output = min(per, key=lambda n: per[n][lead])
    result: dict[str, Any] = {"kind": kind, lead: per[worst_output][lead]}
    for key, pick in rest:
        result[key] = pick(per[n][key] for n in per)
    result.update(
        n_samples=per[worst_output]["n_rows"],
        worst_output=worst_output,
        worst_rows=per[worst_output]["worst_rows"],
        outputs=per,
    )
    return result


def _at_least(label: str, value: float, floor: float) -> tuple[bool, str]:
    ok = value >= floor
    return ok, f"{label} {value:.4f} {'>=' if ok else '<'} min {floor:g}"


def _at_most(label: str, value: float, ceiling: float) -> tuple[bool, str]:
    ok = value <= ceiling
    return ok, f"{label} {value:.4g} {'<=' if ok else '>'} max {ceiling:g}"


def output_verdict(result: Mapping[str, Any], thresholds: GateThresholds) -> Verdict:
    """The gate's decision for a compare_outputs result; the reason states every number."""
    kind = result["kind"]
    if kind == "labels":
        return parity_verdict(dict(result), thresholds)
    checks: list[tuple[bool, str]] = []
    if kind == "embedding":
        checks.append(_at_least("min cosine", result["min_cosine"], thresholds.min_cosine))
        checks.append(_at_least("mean cosine", result["mean_cosine"], thresholds.min_mean_cosine))
    else:
        checks.append(_at_least("R²", result["r2"], thresholds.min_r2))
        if thresholds.max_rel_error is None:
            checks.append((True, f"max rel error {result['max_rel_error']:.4g} (not gated)"))
        else:
            checks.append(
                _at_most("max rel error", result["max_rel_error"], thresholds.max_rel_error)
            )
    if thresholds.max_abs_error is None:
        checks.append((True, f"max abs error {result['max_abs_error']:.4g} (not gated)"))
    else:
        checks.append(_at_most("max abs error", result["max_abs_error"], thresholds.max_abs_error))
    rows = result.get("worst_rows") or []
    where = f"worst output {result['worst_output']!r}"
    if rows:
        where += f", worst row {rows[0]['row']} of {result['n_samples']}"
    passed = all(ok for ok, _ in checks)
    prefix = "ONNX parity passed: " if passed else "ONNX parity failed: "
    return Verdict(
        passed, f"{prefix}{kind} outputs: " + "; ".join(t for _, t in checks) + f" ({where})"
    )


def parity_score(result: Mapping[str, Any]) -> float:
    """One number to rank results by, higher is better: the kind's leading metric."""
    if result["kind"] == "labels":
        return float(result["agreement"]) - float(result.get("max_abs_prob_diff") or 0.0)
    if result["kind"] == "embedding":
        return float(result["min_cosine"])
    return float(result["r2"])


def thresholds_of(kind: str, thresholds: GateThresholds) -> dict[str, Any]:
    """The thresholds that apply to one output kind, for reports."""
    names = {
        "labels": ("min_agreement", "max_prob_diff"),
        "embedding": ("min_cosine", "min_mean_cosine", "max_abs_error"),
        "regression": ("min_r2", "max_rel_error", "max_abs_error"),
    }[kind]
    return {name: getattr(thresholds, name) for name in names}


@dataclass
class OrtRunner:
    """An ONNX Runtime session over any number of rows: chunked runs, outputs concatenated."""

    session: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # A graph exported with a fixed batch size is fed exactly that many rows per run.
    fixed_batch: int | None

    @classmethod
    def of(cls, proto: Any, *, threads: int | None) -> OrtRunner:
        """A session for `proto` with `threads` intra-op threads (None: ORT's default)."""
        from modules.evaluation.inference import ort_session

        specs = onnx_inputs(proto)
        fixed = [s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)]
        fixed_batch = min((d for d in fixed if d > 0), default=None)
        session = ort_session(proto.SerializeToString(), threads=threads)
        return cls(session, specs, onnx_outputs(proto), fixed_batch)

    @property
    def chunk(self) -> int:
        return self.fixed_batch or RUN_CHUNK_ROWS

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """name -> output over all rows (outputs without a row axis are left out)."""
        total = n_rows(feeds)
        try:
            parts = [
                self.session.run(None, take_rows(feeds, slice(start, start + self.chunk)))
                for start in range(0, total, self.chunk)
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

    def batch_sizes(self, wanted: int) -> list[int]:
        """Batch sizes to time: 1 and `wanted`, or the graph's fixed batch size."""
        return [self.fixed_batch] if self.fixed_batch else sorted({1, wanted})


def feed_batch(feeds: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`size` rows of every input, cycling when there are fewer."""
    return take_rows(feeds, np.arange(size) % n_rows(feeds))


def time_feeds(
    fn: Callable[[Mapping[str, np.ndarray]], Any],
    feeds: Mapping[str, np.ndarray],
    *,
    sizes: list[int],
    warmup: int,
    runs: int,
    threads: int | None,
) -> dict[str, Any]:
    """Latency summaries (ms) of `fn` on batches of each size, keyed b{size}."""
    out = {}
    for size in sizes:
        # time_batches only hands its batch to fn, so a dict of named arrays serves as well.
        batch = cast(Any, feed_batch(feeds, size))
        stat, _ = time_batches(fn, batch, warmup=warmup, runs=runs)
        out[f"b{size}"] = stat | {"batch_size": size, "threads": threads or "default"}
    return out


def find_native_model(
    onnx_model: ModelArtifact, ctx: StepContext
) -> tuple[ModelArtifact, dict[str, Any]]:
    """The newest earlier torch/scikit-learn model of the job, preferring the export's source."""
    source = onnx_model.meta.get("source_framework")
    wanted = (source,) if source in NATIVE_FRAMEWORKS else NATIVE_FRAMEWORKS
    if ctx.load_model is not None:
        for record in reversed(ctx.history):
            # A step's output, else its input: a job may start from an uploaded model.
            for side in ("output", "input"):
                key = record.get(f"{side}_key")
                if key and record.get(f"{side}_framework") in wanted:
                    return ctx.load_model(key), {**record, "side": side}
    raise IncompatibleError(
        f"onnx_parity needs an earlier {' or '.join(wanted)} model in this job to compare the "
        "ONNX model against; put onnx_parity after onnx_export in a job that has one (or, for "
        "a bring-your-own ONNX model, after a step that changed it, like onnx_quantize)"
    )


def _earlier_onnx(ctx: StepContext) -> tuple[ModelArtifact, dict[str, Any]] | None:
    """The newest earlier ONNX model of the job other than the step's own input."""
    if ctx.load_model is None or not ctx.history:
        return None
    current = ctx.history[-1].get("output_key")
    for record in reversed(ctx.history):
        for side in ("output", "input"):
            key = record.get(f"{side}_key")
            if key and key != current and record.get(f"{side}_framework") == "onnx":
                return ctx.load_model(key), {**record, "side": side}
    return None


def find_reference_model(
    onnx_model: ModelArtifact, ctx: StepContext
) -> tuple[ModelArtifact, dict[str, Any]]:
    """The native model the graph came from, else the earlier ONNX model it was made from."""
    try:
        return find_native_model(onnx_model, ctx)
    except IncompatibleError:
        found = _earlier_onnx(ctx)
        if found is None:
            raise
        return found


def evaluation_feeds(
    proto: Any, data: Dataset, *, inputs_id: str | None, ctx: StepContext, split: str = "test"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The graph's feeds from the user's inputs file, else from a dataset split; and whence."""
    specs = onnx_inputs(proto)
    if inputs_id is not None:
        if ctx.read_bytes is None:
            raise BadInputError("this runner cannot read stored inputs files")
        arrays = load_stored_inputs(ctx.read_bytes, user_id=ctx.user_id, inputs_id=inputs_id)
        feeds = prepare_feeds(specs, arrays, source=f"inputs file {inputs_id}")
        return feeds, {"inputs": inputs_id, "rows": n_rows(feeds)}
    x = data.X_test if split == "test" else data.X_train
    feeds = dataset_feeds(specs, x, dataset=data.name)
    return feeds, {"dataset": data.name, "split": split, "rows": n_rows(feeds)}


def native_outputs(native: ModelArtifact, kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """The native model's raw output: logits or probabilities for labels, values otherwise."""
    if native.framework == "torch":
        import torch

        module = native.obj.eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

        return run
    estimator = native.obj
    if kind == "labels" and hasattr(estimator, "predict_proba"):
        return estimator.predict_proba
    return lambda x: np.asarray(estimator.predict(x), dtype=np.float64).reshape(len(x), -1)


def check_output_parity(
    reference: ModelArtifact,
    candidate: ModelArtifact,
    feeds: dict[str, np.ndarray],
    params: ParityParams,
) -> tuple[dict[str, Any], Verdict]:
    """Compare the candidate graph's outputs with the reference's on the feeds, by kind."""
    runner = OrtRunner.of(candidate.obj, threads=params.threads)
    reference_fn: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    if reference.framework == "onnx":
        reference_fn = OrtRunner.of(reference.obj, threads=params.threads).run
    else:
        if len(feeds) != 1:
            raise IncompatibleError(
                f"the native {reference.framework} model takes one feature array; the graph "
                f"takes {len(feeds)} inputs"
            )
        # The native model's one output is compared with the graph's first float output.
        name = next((s.name for s in runner.outputs if s.dtype and "float" in s.dtype), None)
        name = name or runner.outputs[0].name
        native_fn = native_outputs(
            reference, params.output_kind if params.output_kind != "auto" else "labels"
        )

        def reference_fn(f: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {name: np.asarray(native_fn(next(iter(f.values()))))}

    ref_out = reference_fn(feeds)
    kind, why = resolve_kind(params.output_kind, candidate.meta, ref_out)
    result = compare_outputs(
        ref_out,
        runner.run(feeds),
        kind=kind,
        worst=params.worst_rows,
        mismatch_sample=params.mismatch_sample,
    )
    verdict = output_verdict(result, params)
    sizes = runner.batch_sizes(params.latency_batch)
    native = reference.framework in NATIVE_FRAMEWORKS
    limit = native_threads(reference.framework, params.threads)
    with limit if native else contextlib.nullcontext():
        ref_ms = time_feeds(
            reference_fn,
            feeds,
            sizes=sizes,
            warmup=params.warmup,
            runs=params.runs,
            threads=params.threads,
        )
    ort_ms = time_feeds(
        runner.run,
        feeds,
        sizes=sizes,
        warmup=params.warmup,
        runs=params.runs,
        threads=params.threads,
    )
    report = {
        **result,
        "kind_reason": why,
        "passed": verdict.passed,
        "reason": verdict.reason,
        "thresholds": thresholds_of(kind, params),
        "latency_ms": {"reference": ref_ms, "onnxruntime": ort_ms},
        "speedup_median": {
            k: ref_ms[k]["median"] / ort_ms[k]["median"] for k in ref_ms if ort_ms[k]["median"]
        },
        "opset": _opsets(candidate.obj),
        "onnx": {
            "source_framework": candidate.meta.get("source_framework"),
            "quantized": candidate.meta.get("quantized"),
            "size_bytes": candidate.obj.ByteSize(),
            "inputs": [s.as_dict() for s in runner.inputs],
        },
        "reference": {"framework": reference.framework},
    }
    if reference.framework == "onnx":
        report["reference"]["size_bytes"] = reference.obj.ByteSize()
    return report, verdict


def _latency(scores: Any, x: np.ndarray, params: ParityParams) -> dict[str, Any]:
    out = {}
    for size in sorted({1, params.latency_batch}):
        stat, _ = time_batches(scores, batch_of(x, size), warmup=params.warmup, runs=params.runs)
        out[f"b{size}"] = stat | {"batch_size": size, "threads": params.threads or "default"}
    return out


@contextlib.contextmanager
def native_threads(framework: str, threads: int | None) -> Iterator[None]:
    """Limit torch's intra-op pool or scikit-learn's OpenMP/BLAS pools for a while."""
    if threads is None:
        yield
    elif framework == "torch":
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            yield


def ort_scores(onnx_model: ModelArtifact, threads: int | None) -> Any:
    """A scoring function on an ONNX Runtime session with the given intra-op threads."""
    from modules.evaluation.inference import ort_session

    session = ort_session(onnx_model.obj.SerializeToString(), threads=threads)
    inp = session.get_inputs()[0]
    dtype = np.float64 if "double" in inp.type else np.float32

    def scores(x: np.ndarray) -> Any:
        return session.run(None, {inp.name: x.astype(dtype, copy=False)})

    return scores


def _opsets(proto: Any) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}


def check_parity(
    native: ModelArtifact, onnx_model: ModelArtifact, data: Dataset, params: ParityParams
) -> tuple[dict[str, Any], Verdict]:
    """Predict the test split with both, time both; returns (report, verdict)."""
    x = data.X_test
    native_pred = make_predictor(native)
    native_pred.check_features(x)
    native_scores = np.asarray(native_pred.scores(x))
    # The native model is timed before ONNX Runtime first runs: ORT's worker threads keep
    # spinning after a run, and on a small machine they would steal the cores torch's or
    # scikit-learn's threads are timed on.
    with native_threads(native.framework, params.threads):
        native_ms = _latency(native_pred.scores, x, params)
    onnx_pred = make_predictor(onnx_model)
    onnx_pred.check_features(x)
    compare_probs = native.framework == "torch" or hasattr(native.obj, "predict_proba")
    onnx_scores = np.asarray(onnx_pred.scores(x))
    result = compare_predictions(
        native_scores,
        onnx_scores,
        mismatch_sample=params.mismatch_sample,
        compare_probs=compare_probs,
    )
    result["worst_rows"] = label_worst_rows(native_scores, onnx_scores, worst=params.worst_rows)
    # The predictor scores with the graph's first float output; name it for the report.
    floats = [o.name for o in onnx_outputs(onnx_model.obj) if o.dtype and "float" in o.dtype]
    result["worst_output"] = floats[0] if floats else None
    verdict = parity_verdict(result, params)
    ort_ms = _latency(ort_scores(onnx_model, params.threads), x, params)
    report = {
        **result,
        "passed": verdict.passed,
        "reason": verdict.reason,
        "thresholds": {
            "min_agreement": params.min_agreement,
            "max_prob_diff": params.max_prob_diff,
        },
        "latency_ms": {"native": native_ms, "onnxruntime": ort_ms},
        "speedup_median": {
            k: native_ms[k]["median"] / ort_ms[k]["median"]
            for k in native_ms
            if ort_ms[k]["median"]
        },
        "opset": _opsets(onnx_model.obj),
        "onnx": {
            "source_framework": onnx_model.meta.get("source_framework"),
            "precision": onnx_model.meta.get("precision"),
            "quantized": onnx_model.meta.get("quantized"),
            "size_bytes": onnx_model.obj.ByteSize(),
        },
        "native": {"framework": native.framework},
        "dataset": data.describe(),
    }
    return report, verdict


GENERIC_HEADLINE = (
    "kind",
    "kind_reason",
    "n_samples",
    "agreement",
    "max_abs_prob_diff",
    "min_cosine",
    "mean_cosine",
    "r2",
    "max_rel_error",
    "max_abs_error",
    "worst_output",
    "latency_ms",
    "speedup_median",
    "opset",
)


@register_step("onnx_parity", params=ParityParams, accepts={"onnx"}, gate=True)
def onnx_parity(
    model: ModelArtifact, data: Dataset, params: ParityParams, ctx: StepContext
) -> StepOutput:
    """Gate: ONNX Runtime must agree with the native model, or a BYO graph with its original."""
    from modules.pipeline.run import library_versions

    reference, record = find_reference_model(model, ctx)
    side = record["side"]
    origin = {
        "step": record.get("step"),
        "key": record.get(f"{side}_key"),
        "as": f"{side} of the step",
    }
    by_labels = params.inputs is None and params.output_kind in ("auto", "labels")
    if reference.framework == "onnx" or not by_labels:
        feeds, source = evaluation_feeds(model.obj, data, inputs_id=params.inputs, ctx=ctx)
        report, verdict = check_output_parity(reference, model, feeds, params)
        report["reference"].update(origin)
        report["inputs"] = source
        report["versions"] = library_versions()
        headline = [k for k in GENERIC_HEADLINE if k in report]
        metrics = {k: report[k] for k in headline}
        metrics["worst_rows"] = report["worst_rows"][:5]
        files = {"deployment_report.json": json.dumps(report, indent=2, default=str).encode()}
        return StepOutput(model=None, metrics=metrics, files=files, verdict=verdict)
    report, verdict = check_parity(reference, model, data, params)
    report["native"].update(origin)
    report["versions"] = library_versions()
    metrics = {
        k: report[k]
        for k in (
            "agreement",
            "max_abs_prob_diff",
            "n_samples",
            "n_mismatched",
            "mismatched_indices_sample",
            "latency_ms",
            "speedup_median",
            "opset",
        )
    }
    files = {"deployment_report.json": json.dumps(report, indent=2, default=str).encode()}
    return StepOutput(model=None, metrics=metrics, files=files, verdict=verdict)


def main(argv: list[str] | None = None) -> int:
    """Export a native model file to ONNX and gate it: 0 passed, 1 rejected, 2 bad input.

    The gate needs the model the ONNX graph came from, so this runs the two-step job
    onnx_export -> onnx_parity through the in-process runner (and so through run_step).
    """
    import sys
    import tempfile
    from pathlib import Path

    from modules.core.jobspec import parse_job_spec
    from modules.errors import McaasError
    from modules.pipeline.local import LocalWorkspace, write_atomic
    from modules.pipeline.script import base_parser

    parser = base_parser("Export a model to ONNX and check ONNX Runtime parity on the test split.")
    parser.add_argument("--min-agreement", type=float, default=0.98, help="Min label agreement.")
    parser.add_argument("--max-prob-diff", type=float, default=0.05, help="Max |prob diff|.")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17).")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="mcaas-parity-") as tmp:
            ws = LocalWorkspace(Path(tmp))
            key = ws.import_model(args.input_model, user_id="local", trust_pickle=args.trust_pickle)
            spec = parse_job_spec(
                {
                    "model": key,
                    "dataset": args.dataset,
                    "profile": args.profile,
                    "seed": args.seed,
                    "steps": [
                        {"name": "onnx_export", "params": {"opset": args.opset}},
                        {
                            "name": "onnx_parity",
                            "params": {
                                "min_agreement": args.min_agreement,
                                "max_prob_diff": args.max_prob_diff,
                            },
                        },
                    ],
                }
            )
            result = ws.run(spec, trust_pickle=args.trust_pickle)
            last = result.records[-1] if result.records else {}
            if result.status == "COMPLETED" and args.output_model is not None:
                if args.output_model.suffix != ".onnx":
                    raise IncompatibleError(f"output {args.output_model.name}: use *.onnx")
                write_atomic(args.output_model, ws.store.get_bytes(last["output_key"]))
    except McaasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    line = {
        "step": "onnx_parity",
        "status": result.status.value,
        "reason": result.reason,
        "output_model": str(args.output_model) if result.status == "COMPLETED" else None,
        "verdict": last.get("verdict"),
        "metrics": last.get("metrics"),
    }
    print(json.dumps(line, default=str))
    return 0 if result.status == "COMPLETED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
