"""The `profile` step: where a model's parameters, FLOPs, memory and time go, layer by layer.

torch: one row per leaf module (and per module that holds tensors of its own), in module
order, with
  params           parameters and buffers the layer stores, counted as `measure` counts them
                   (BatchNorm running stats included), so the rows sum to the model total;
  nonzero_params, param_bytes;
  flops            torch.utils.flop_counter on the layer's own input at `batch_size`: 2 per
                   multiply-accumulate of matmul/conv; elementwise ops, bias adds, norms and
                   pools count 0. The int8 kernel of Int8Linear is invisible to the counter,
                   so it is counted as 2 x in x out per row (flops_method says which);
  activation_bytes the bytes of the tensor the layer emits for one batch;
  latency          ms per forward of the layer, timed with forward pre/post hooks over `runs`
                   runs after `warmup`: median with its 95% CI, and its share of the whole
                   forward time (per run, then summarized). Hook timing adds overhead and
                   misses work done outside leaf modules (e.g. a residual add), so read the
                   shares as relative: `other_share` is what the layers do not account for;
  and each quantity's share of the model total.
scikit-learn: KNN -> one row per class with the samples stored and their bytes, plus the
search index; forests -> one row per tree with nodes, leaves, depth and bytes; any other
estimator -> one row per fitted array. Pipelines are profiled step by step.

The table goes out as metrics["layers"] (JSON in the step record) and profile.csv; the
input model passes through unchanged.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput

# The array walk `measure` counts with, so per-part numbers agree with its totals.
from modules.evaluation.measure import _sklearn_arrays, batch_of, count_params
from modules.evaluation.stats import summarize
from modules.storage.datasets import Dataset

ROOT_NAME = "(model)"
HOOK_NOTE = (
    "latency from forward pre/post hooks on each layer: the hooks add overhead and miss "
    "work outside leaf modules, so shares are relative; other_share is the rest"
)
FLOPS_NOTE = (
    "torch.utils.flop_counter: 2 per multiply-accumulate of matmul/conv ops at batch_size; "
    "elementwise ops, bias adds, norms and pools count 0"
)


class ProfileParams(BaseModel):
    """Params of the `profile` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(
        default=1,
        ge=1,
        le=4096,
        description="Rows per forward for FLOPs, activation memory and latency.",
    )
    warmup: int = Field(default=5, ge=0, le=1000, description="Untimed forwards before timing.")
    runs: int = Field(default=30, ge=2, le=10_000, description="Timed forwards (hooks on).")


# --- torch -----------------------------------------------------------------------------------


def _shown(name: str) -> str:
    return name or ROOT_NAME


def layer_modules(model: Any) -> dict[str, Any]:
    """name -> module for the rows of the table: leaves, and modules with tensors of their own."""
    owners = {key.rpartition(".")[0] for key in model.state_dict()}
    rows = {}
    for name, module in model.named_modules():
        if name in owners or not list(module.children()):
            rows[name] = module
    return rows


def _nearest_rows(names: list[str]) -> dict[str, list[str]]:
    """row -> the rows directly inside it (no other row in between), for exclusive sums."""
    inside: dict[str, list[str]] = {n: [] for n in names}
    for name in names:
        parents = [p for p in names if p != name and (p == "" or name.startswith(p + "."))]
        if parents:
            inside[max(parents, key=len)].append(name)
    return inside


def _exclusive(values: dict[str, float], inside: dict[str, list[str]]) -> dict[str, float]:
    return {n: v - sum(values[c] for c in inside[n]) for n, v in values.items()}


def _tensor_bytes(out: Any) -> int:
    import torch

    if isinstance(out, torch.Tensor):
        return int(out.numel() * out.element_size())
    if isinstance(out, list | tuple):
        return sum(_tensor_bytes(o) for o in out)
    return 0


def _shape(out: Any) -> list[int] | None:
    import torch

    return list(out.shape) if isinstance(out, torch.Tensor) else None


def _stored_tensors(model: Any) -> dict[str, tuple[int, int, int]]:
    """owner module -> (numbers, non-zero numbers, bytes), counted like count_params."""
    out: dict[str, tuple[int, int, int]] = {}
    for key, tensor in model.state_dict().items():
        if not (tensor.is_floating_point() or tensor.dtype.is_signed):
            continue
        owner = key.rpartition(".")[0]
        n, nz, b = out.get(owner, (0, 0, 0))
        out[owner] = (
            n + tensor.numel(),
            nz + int((tensor != 0).sum()),
            b + tensor.numel() * tensor.element_size(),
        )
    return out


def _layer_flops(module: Any, args: tuple[Any, ...]) -> tuple[int, str]:
    """FLOPs of one call of `module` on `args`, and how they were counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from modules.storage.layers import Int8Linear

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(*args)
    counted = int(counter.get_total_flops())
    if counted == 0 and isinstance(module, Int8Linear) and isinstance(args[0], torch.Tensor):
        # The packed int8 kernel is not an op the counter knows (its dequantize fallback is).
        rows = args[0].numel() // module.in_features
        return 2 * rows * module.in_features * module.out_features, "formula 2 x in x out"
    return counted, "flop_counter"


def _record_calls(model: Any, rows: dict[str, Any], x: Any) -> dict[str, list[tuple[Any, Any]]]:
    """One forward with hooks: each row's (inputs, output) per call.

    x: the model's input tensor, or a tuple of its positional inputs.
    """
    import torch

    x = x if isinstance(x, tuple) else (x,)

    calls: dict[str, list[tuple[Any, Any]]] = {name: [] for name in rows}

    def hook_for(name: str) -> Any:
        def hook(_m: Any, args: tuple[Any, ...], out: Any) -> None:
            calls[name].append((args, out))

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in rows.items()]
    try:
        with torch.inference_mode():
            model(*x)
    finally:
        for h in handles:
            h.remove()
    return calls


def time_layers(
    model: Any, rows: dict[str, Any], x: Any, *, warmup: int, runs: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Per-row ms per run (inclusive of nested rows) and the whole forward's ms, hooks on.

    x: the model's input tensor, or a tuple of its positional inputs.
    """
    import torch

    x = x if isinstance(x, tuple) else (x,)

    per_run: dict[str, list[float]] = {name: [] for name in rows}
    started: dict[str, int] = {}
    current: dict[str, int] = {}

    def pre_for(name: str) -> Any:
        def pre(_m: Any, _args: Any) -> None:
            started[name] = time.perf_counter_ns()

        return pre

    def post_for(name: str) -> Any:
        def post(_m: Any, _args: Any, _out: Any) -> None:
            current[name] += time.perf_counter_ns() - started[name]

        return post

    handles = []
    for name, module in rows.items():
        handles.append(module.register_forward_pre_hook(pre_for(name)))
        handles.append(module.register_forward_hook(post_for(name)))
    totals: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(warmup + runs):
                current.update(dict.fromkeys(rows, 0))
                t0 = time.perf_counter_ns()
                model(*x)
                elapsed = time.perf_counter_ns() - t0
                if i >= warmup:
                    totals.append(elapsed / 1e6)
                    for name in rows:
                        per_run[name].append(current[name] / 1e6)
    finally:
        for h in handles:
            h.remove()
    return per_run, totals


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def profile_torch(
    artifact: ModelArtifact, x_np: np.ndarray, *, warmup: int, runs: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The per-layer table of a torch model on the batch `x_np`, and the model totals."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from modules.training.finetune import as_tensors, eval_mode

    model = eval_mode(artifact.obj)
    x = as_tensors(x_np)
    rows = layer_modules(model)
    names = list(rows)
    inside = _nearest_rows(names)
    stored = _stored_tensors(model)
    calls = _record_calls(model, rows, x)
    flops_incl: dict[str, float] = {}
    methods: dict[str, str] = {}
    for name, module in rows.items():
        total, method = 0, "flop_counter"
        for args, _out in calls[name]:
            n, method = _layer_flops(module, args)
            total += n
        flops_incl[name], methods[name] = float(total), method
    flops = _exclusive(flops_incl, inside)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*x)
    # The int8 kernel is invisible to the whole-model count too; add its formula count.
    model_flops = int(counter.get_total_flops()) + int(
        sum(flops[n] for n in names if methods[n] != "flop_counter")
    )
    per_run, forward_ms = time_layers(model, rows, x, warmup=warmup, runs=runs)
    exclusive_runs = {
        name: [per_run[name][i] - sum(per_run[c][i] for c in inside[name]) for i in range(runs)]
        for name in names
    }
    act = {n: sum(_tensor_bytes(out) for _a, out in calls[n]) for n in names}
    total_params, total_nonzero = count_params(artifact)
    total_bytes = sum(b for _n, _nz, b in stored.values())
    total_act = sum(act.values())
    flops_in_layers = sum(flops.values())
    table = []
    for name in names:
        n, nz, b = stored.get(name, (0, 0, 0))
        lat = summarize(exclusive_runs[name], unit="ms")
        shares = [t / f for t, f in zip(exclusive_runs[name], forward_ms, strict=True) if f > 0]
        share = summarize(shares) if shares else None
        out_shapes = [_shape(out) for _a, out in calls[name]]
        table.append(
            {
                "name": _shown(name),
                "type": type(rows[name]).__name__,
                "params": n,
                "params_share": _share(n, total_params),
                "nonzero_params": nz,
                "param_bytes": b,
                "flops": int(flops[name]),
                "flops_share": _share(flops[name], flops_in_layers),
                "flops_method": methods[name],
                "activation_bytes": act[name],
                "activation_share": _share(act[name], total_act),
                "output_shape": out_shapes[0] if len(out_shapes) == 1 else out_shapes,
                "calls": len(calls[name]),
                "latency_ms": lat["median"],
                "latency_ci95": lat["median_ci95"],
                "latency_share": share["median"] if share else None,
                "latency_share_ci95": share["median_ci95"] if share else None,
                "latency_stats": lat,
            }
        )
    layer_share = [
        sum(exclusive_runs[n][i] for n in names) / forward_ms[i]
        for i in range(runs)
        if forward_ms[i] > 0
    ]
    totals = {
        "framework": "torch",
        "n_layers": len(table),
        "params": total_params,
        "nonzero_params": total_nonzero,
        "param_bytes": total_bytes,
        "flops": model_flops,
        "flops_in_layers": int(flops_in_layers),
        "activation_bytes": total_act,
        "forward_ms": summarize(forward_ms, unit="ms"),
        "other_share": 1.0 - float(np.median(layer_share)) if layer_share else None,
        "batch_size": int(x[0].shape[0]),
        "threads": int(torch.get_num_threads()),
        "warmup": warmup,
        "runs": runs,
        "flops_note": FLOPS_NOTE,
        "latency_note": HOOK_NOTE,
    }
    return table, totals


# --- scikit-learn ----------------------------------------------------------------------------


def _array_stats(obj: Any) -> tuple[int, int]:
    """(numbers, bytes) of the fitted arrays inside `obj`."""
    arrays = list(_sklearn_arrays(obj, seen=set()))
    return sum(int(a.size) for a in arrays), sum(int(a.nbytes) for a in arrays)


def _knn_rows(est: Any, prefix: str) -> Iterator[dict[str, Any]]:
    fit_x = np.asarray(est._fit_X)
    labels = np.asarray(est._y)
    classes = np.asarray(getattr(est, "classes_", np.unique(labels)))
    per_sample = fit_x.shape[1] * fit_x.itemsize + labels.itemsize
    for index, label in enumerate(classes):
        # KNN stores class indices in _y (single-output), not the labels themselves.
        n = int((labels == index).sum()) if labels.ndim == 1 else 0
        yield {
            "name": f"{prefix}class {label}",
            "type": "stored samples",
            "stored_samples": n,
            "params": n * (fit_x.shape[1] + 1),
            "bytes": n * per_sample,
        }
    tree = getattr(est, "_tree", None)
    if tree is not None:
        numbers, nbytes = _array_stats(tree)
        # The index holds its own copy of the samples; the rows above count them once.
        yield {
            "name": f"{prefix}search index",
            "type": type(tree).__name__,
            "stored_samples": 0,
            "params": numbers,
            "bytes": nbytes,
        }


def _tree_row(tree_est: Any, name: str) -> dict[str, Any]:
    tree = tree_est.tree_
    numbers, nbytes = _array_stats(tree_est)
    return {
        "name": name,
        "type": type(tree_est).__name__,
        "nodes": int(tree.node_count),
        "leaves": int(tree.n_leaves),
        "depth": int(tree.max_depth),
        "params": numbers,
        "bytes": nbytes,
    }


def sklearn_layer_rows(est: Any, prefix: str = "") -> list[dict[str, Any]]:
    """The per-part table of a scikit-learn model: samples, trees or fitted arrays."""
    if hasattr(est, "steps"):
        rows: list[dict[str, Any]] = []
        for step_name, step in est.steps:
            if step is not None and step != "passthrough":
                rows += sklearn_layer_rows(step, f"{prefix}{step_name}/")
        return rows
    if hasattr(est, "_fit_X"):
        return list(_knn_rows(est, prefix))
    trees = getattr(est, "estimators_", None)
    if isinstance(trees, list | np.ndarray) and len(trees) and hasattr(trees[0], "tree_"):
        return [_tree_row(t, f"{prefix}tree {i}") for i, t in enumerate(trees)]
    if hasattr(est, "tree_"):
        return [_tree_row(est, f"{prefix}tree")]
    rows = []
    for attr, value in sorted(vars(est).items()):
        if attr.endswith("_") and isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            rows.append(
                {
                    "name": f"{prefix}{attr}",
                    "type": f"{type(est).__name__} array {list(value.shape)}",
                    "params": int(value.size),
                    "bytes": int(value.nbytes),
                }
            )
    return rows


def profile_sklearn(artifact: ModelArtifact) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The per-part table of a scikit-learn model, each with its share, and the totals."""
    rows = sklearn_layer_rows(artifact.obj)
    total_params = sum(r["params"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    for row in rows:
        row["params_share"] = _share(row["params"], total_params)
        row["bytes_share"] = _share(row["bytes"], total_bytes)
    totals: dict[str, Any] = {
        "framework": "sklearn",
        "estimator": type(artifact.obj).__name__,
        "n_layers": len(rows),
        "params": total_params,
        "bytes": total_bytes,
        "model_params": count_params(artifact)[0],
        "latency_note": "per-part latency is measured for torch models only",
    }
    if any("stored_samples" in r for r in rows):
        totals["stored_samples"] = sum(r.get("stored_samples", 0) for r in rows)
    if any("nodes" in r for r in rows):
        totals["nodes"] = sum(r["nodes"] for r in rows if "nodes" in r)
        totals["max_depth"] = max(r["depth"] for r in rows if "depth" in r)
    return rows, totals


# --- output ----------------------------------------------------------------------------------


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return value


def layers_csv(rows: list[dict[str, Any]]) -> bytes:
    """The table as CSV: every flat column, pairs and shapes written as "a;b"."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, dict)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return buf.getvalue().encode()


@register_step("profile", params=ProfileParams, accepts={"torch", "sklearn"})
def profile(
    model: ModelArtifact, data: Dataset, params: ProfileParams, ctx: StepContext
) -> StepOutput:
    """Per-layer table: params, FLOPs, activation memory and latency share (torch), or parts."""
    if model.framework == "torch":
        from modules.training.finetune import check_fits_data

        check_fits_data(model.obj, data.X_test, num_classes=data.n_classes, what="the model")
        x = batch_of(data.X_test, params.batch_size)
        rows, totals = profile_torch(model, x, warmup=params.warmup, runs=params.runs)
    else:
        rows, totals = profile_sklearn(model)
    return StepOutput(
        model=None,
        metrics={"layers": rows, "totals": totals},
        files={"profile.csv": layers_csv(rows)},
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.evaluation.profile --input-model m.pt`: the table as one JSON line."""
    from modules.pipeline.script import script_main

    return script_main("profile", argv)


if __name__ == "__main__":
    raise SystemExit(main())
