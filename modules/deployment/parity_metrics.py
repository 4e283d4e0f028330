"""The parity metrics: how close a candidate model's outputs are to a reference's, and the verdict.

Pure functions on arrays, shared by the onnx_parity gate and onnx_quantize's int8 search:
label agreement and max |prob diff| (labels), per-row cosine and max absolute error
(embedding), max absolute and relative error and R² (regression), the output-kind inference,
and the thresholds (`GateThresholds`) each kind is judged by.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modules.core.step import Verdict
from modules.errors import BadInputError, IncompatibleError

NATIVE_FRAMEWORKS = ("torch", "sklearn")
OutputKind = Literal["auto", "labels", "embedding", "regression"]


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


def worst_batch(results: Mapping[int, Mapping[str, Any]], verdicts: Mapping[int, Verdict]) -> int:
    """The batch size a gate is judged by: a failing one first, then the lowest parity score."""
    return min(results, key=lambda b: (verdicts[b].passed, parity_score(results[b]), -b))


def batch_verdict(verdicts: Mapping[int, Verdict], worst: int) -> Verdict:
    """The worst batch size's verdict, its reason saying at which batch size of which."""
    sizes = ", ".join(str(b) for b in sorted(verdicts))
    verdict = verdicts[worst]
    where = f" at {worst} rows per call (worst of batch sizes {sizes})"
    return Verdict(verdict.passed, verdict.reason + where)
