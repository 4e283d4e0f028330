"""The in-memory model a step receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Framework = Literal["torch", "sklearn", "onnx"]

FILE_SUFFIX: dict[str, str] = {"torch": ".pt", "sklearn": ".skops", "onnx": ".onnx"}
# meta["format"] -> suffix, for frameworks with more than one safe format (torch: .pt2).
FORMAT_SUFFIX: dict[str, str] = {"pt2": ".pt2"}


@dataclass
class ModelArtifact:
    """A loaded model plus what is needed to save it safely again.

    `obj` is an `nn.Module` (torch), a fitted estimator (sklearn) or an
    `onnx.ModelProto` (onnx). `meta` carries facts that travel with the model:
    the input feature count, class count, the zoo arch it came from.
    """

    framework: Framework
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        fmt = self.meta.get("format")
        if isinstance(fmt, str) and fmt in FORMAT_SUFFIX:
            return FORMAT_SUFFIX[fmt]
        return FILE_SUFFIX[self.framework]
