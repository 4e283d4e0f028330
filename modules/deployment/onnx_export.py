"""The `onnx_export` step: torch through torch.onnx.export, scikit-learn through skl2onnx.

torch: the TorchScript exporter (`dynamo=False`, opset >= 17) with a dynamic batch axis on
the input and the logits (a model with declared inputs, `meta["inputs"]`, keeps their names,
shapes and dtypes, every input with a dynamic batch axis and its dynamic dims named
`<input>_<axis>`); the graph emits logits, and `source_framework: torch` in the
artifact's meta tells the ONNX predictor to apply softmax. scikit-learn: skl2onnx with
`zipmap=False`, so probabilities come back as one tensor. float32 can flip a KNN tie or
land a sample on the other side of a tree threshold; with `precision: auto` the float32
graph's labels are compared with the native model's on the test split and, when any
differ, a float64 graph is built and kept if it flips fewer. Every graph then passes
`onnx.checker.check_model` (full check).

An export that fails (an unsupported layer or estimator, a checker error) is not an
exception: the step returns a failed verdict carrying the converter's message, so the job
ends REJECTED with that reason. That is why the step is registered as a gate.

The source framework, class count and precision are also written to the graph's
`metadata_props` (`mcaas.*`), so they survive a save and load of the .onnx file.
"""

from __future__ import annotations

import io
import time
import warnings
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict
from modules.errors import IncompatibleError, McaasError
from modules.evaluation.inference import make_predictor
from modules.storage.datasets import Dataset
from modules.storage.inputs import TensorSpec, dataset_for_model, torch_input_specs

META_PREFIX = "mcaas."
INPUT_NAME = "input"


class ExportError(McaasError):
    """A converter could not turn the model into a valid ONNX graph (its message kept)."""

    code = "export_failed"


class OnnxExportParams(BaseModel):
    """Params of the `onnx_export` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    opset: int = Field(default=17, ge=17, le=21, description="ONNX opset of the exported graph.")
    precision: Literal["auto", "float32", "float64"] = Field(
        default="auto",
        description=(
            "scikit-learn input precision: auto = float32 unless it flips test labels, "
            "then float64 if that flips fewer. torch graphs are always float32."
        ),
    )


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 600 else text[:597] + "..."
    return f"{type(exc).__name__}: {text}"


def check_onnx(proto: Any) -> None:
    """onnx.checker's full check; raises ExportError with the checker's message."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # the checker raises ValidationError and other kinds alike
        raise ExportError(f"onnx.checker rejected the graph: {_message(exc)}") from exc


def export_torch(
    module: Any,
    *,
    in_features: int,
    opset: int = 17,
    inputs: list[TensorSpec] | None = None,
    sample: np.ndarray | None = None,
) -> Any:
    """Export an nn.Module to ONNX with a dynamic batch.

    Without `inputs`: one (batch, in_features) float32 input named `input`. With them (the
    model's declared inputs, batch axis first) and `sample` (rows of the dataset shaped for
    the model): one named input each, dims declared dynamic (None or symbolic) kept dynamic.
    """
    import onnx
    import torch

    from modules.storage.graph_layers import lift_layers
    from modules.training.finetune import as_tensors, eval_mode

    # The TorchScript exporter switches modes, which an exported program's module refuses.
    module = eval_mode(lift_layers(module))
    if inputs:
        if sample is None:
            raise ExportError("exporting declared inputs needs sample rows")
        args = as_tensors(sample[:2])
        names = [spec.name for spec in inputs]
        axes = {
            spec.name: {0: "batch"}
            | {
                axis: f"{spec.name}_{axis}"
                for axis, dim in enumerate(spec.shape or ())
                if axis and not isinstance(dim, int)
            }
            for spec in inputs
        }
    else:
        args = (torch.zeros(1, in_features, dtype=torch.float32),)
        names = [INPUT_NAME]
        axes = {INPUT_NAME: {0: "batch"}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation on every call; the
            # DESIGN notes pin it as the path known to work with torch 2.13 here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "batch"}},
            )
    except Exception as exc:  # the exporter's failures have many types; all mean "cannot"
        raise ExportError(f"torch.onnx.export failed: {_message(exc)}") from exc
    return onnx.load_model_from_string(buf.getvalue())


def export_sklearn(
    estimator: Any, *, in_features: int, opset: int = 17, dtype: str = "float32"
) -> Any:
    """Convert a fitted scikit-learn estimator with skl2onnx (zipmap off where it applies)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    tensor_type = DoubleTensorType if dtype == "float64" else FloatTensorType
    # zipmap is an option of probabilistic classifiers only; others reject the option.
    options = {"zipmap": False} if hasattr(estimator, "predict_proba") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = convert_sklearn(
                estimator,
                initial_types=[(INPUT_NAME, tensor_type([None, in_features]))],
                options=options,
                target_opset=opset,
            )
    except Exception as exc:  # skl2onnx raises RuntimeError, NameError, its own types...
        raise ExportError(
            f"skl2onnx could not convert {type(estimator).__name__}: {_message(exc)}"
        ) from exc
    dedupe_opsets(proto)
    return proto


def dedupe_opsets(proto: Any) -> None:
    """One opset_import entry per domain (the highest version).

    skl2onnx can list the default domain twice; ONNX Runtime's quantizer then fails with
    "Failed to find proper ai.onnx domain".
    """
    versions: dict[str, int] = {}
    for entry in proto.opset_import:
        versions[entry.domain] = max(versions.get(entry.domain, 0), int(entry.version))
    del proto.opset_import[:]
    for domain, version in versions.items():
        entry = proto.opset_import.add()
        entry.domain, entry.version = domain, version


def tag_onnx(proto: Any, meta: dict[str, Any]) -> None:
    """Write `mcaas.*` metadata_props (replacing earlier ones) so meta survives save/load."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key in ("source_framework", "num_classes", "precision", "quantized"):
        if meta.get(key) is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = f"{META_PREFIX}{key}", str(meta[key])


def onnx_artifact(proto: Any, meta: dict[str, Any]) -> ModelArtifact:
    """An ONNX ModelArtifact whose meta is also stored in the graph's metadata_props."""
    tag_onnx(proto, meta)
    return ModelArtifact("onnx", proto, dict(meta))


def input_width(artifact: ModelArtifact, data: Dataset) -> int:
    """The model's feature count, checked against the dataset's."""
    width = artifact.meta.get("in_features") or getattr(artifact.obj, "n_features_in_", None)
    width = int(width) if width else data.n_features
    if width != data.n_features:
        raise IncompatibleError(
            f"model expects {width} input features, dataset {data.name} has {data.n_features}"
        )
    return width


def label_flips(native_labels: np.ndarray, artifact: ModelArtifact, x: np.ndarray) -> int:
    """How many samples of x the ONNX artifact labels differently from `native_labels`."""
    return int((make_predictor(artifact).labels(x) != native_labels).sum())


def export_model(
    artifact: ModelArtifact, data: Dataset, params: OnnxExportParams
) -> tuple[ModelArtifact, dict[str, Any]]:
    """Export and check; returns the ONNX artifact and what was decided (raises ExportError)."""
    info: dict[str, Any] = {"opset": params.opset, "source_framework": artifact.framework}
    declared = artifact.framework == "torch" and bool(artifact.meta.get("inputs"))
    if declared:
        specs = torch_input_specs(artifact.meta)
        shaped = dataset_for_model(data, specs)
        proto = export_torch(
            artifact.obj,
            in_features=shaped.n_features,
            opset=params.opset,
            inputs=specs,
            sample=shaped.X_test,
        )
        check_onnx(proto)
        info["precision"] = "float32"
        meta = {
            "source_framework": "torch",
            "source_format": artifact.meta.get("format"),
            "inputs": artifact.meta["inputs"],
            "num_classes": artifact.meta.get("num_classes") or data.n_classes,
            "precision": "float32",
        }
        return onnx_artifact(proto, meta), info
    width = input_width(artifact, data)
    base_meta = {
        "source_framework": artifact.framework,
        "in_features": width,
        "num_classes": artifact.meta.get("num_classes") or data.n_classes,
    }
    if artifact.framework == "torch":
        proto = export_torch(artifact.obj, in_features=width, opset=params.opset)
        check_onnx(proto)
        info["precision"] = "float32"
        return onnx_artifact(proto, {**base_meta, "precision": "float32"}), info
    first = "float64" if params.precision == "float64" else "float32"
    proto = export_sklearn(artifact.obj, in_features=width, opset=params.opset, dtype=first)
    check_onnx(proto)
    out = onnx_artifact(proto, {**base_meta, "precision": first})
    info["precision"] = first
    if params.precision == "auto":
        native = make_predictor(artifact).labels(data.X_test)
        flips = label_flips(native, out, data.X_test)
        info["float32_label_flips"] = flips
        if flips:
            proto64 = export_sklearn(
                artifact.obj, in_features=width, opset=params.opset, dtype="float64"
            )
            check_onnx(proto64)
            out64 = onnx_artifact(proto64, {**base_meta, "precision": "float64"})
            flips64 = label_flips(native, out64, data.X_test)
            info["float64_label_flips"] = flips64
            if flips64 < flips:
                out, info["precision"] = out64, "float64"
    return out, info


@register_step("onnx_export", params=OnnxExportParams, accepts={"torch", "sklearn"}, gate=True)
def onnx_export(
    model: ModelArtifact, data: Dataset, params: OnnxExportParams, ctx: StepContext
) -> StepOutput:
    """Export to ONNX (torch or scikit-learn) and check it; a failed export rejects the job."""
    start = time.perf_counter()
    try:
        artifact, info = export_model(model, data, params)
    except ExportError as exc:
        reason = f"ONNX export of the {model.framework} model failed: {exc}"
        return StepOutput(
            model=None,
            metrics={"exported": False, "error": str(exc), "opset": params.opset},
            verdict=Verdict(False, reason),
        )
    info["exported"] = True
    info["export_time_s"] = time.perf_counter() - start
    info["onnx_size_bytes"] = artifact.obj.ByteSize()
    info["input_dtype"] = "float64" if info["precision"] == "float64" else "float32"
    reason = (
        f"exported {model.framework} -> ONNX opset {params.opset} ({info['precision']}), "
        "onnx.checker passed"
    )
    return StepOutput(model=artifact, metrics=info, verdict=Verdict(True, reason))


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.deployment.onnx_export --input-model m.pt --output-model m.onnx`."""
    from modules.pipeline.script import script_main

    return script_main("onnx_export", argv)


if __name__ == "__main__":
    raise SystemExit(main())
