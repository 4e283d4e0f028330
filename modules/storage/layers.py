"""The torch layer classes the module-tree format allow-lists beside torch.nn's own.

`ResidualBlock` is a container whose state lives in its children; `Int8Linear` and
`Float16Linear` are the quantize_dynamic step's linears, holding plain tensors only so that
their files load with weights_only=True.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn plus a shortcut, then relu; all state lives in the children."""

    def __init__(
        self,
        *,
        conv1: nn.Module,
        bn1: nn.Module,
        conv2: nn.Module,
        bn2: nn.Module,
        shortcut: nn.Module,
    ) -> None:
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.conv2 = conv2
        self.bn2 = bn2
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 with one float32 scale per output row.

    The file holds only plain tensors (int8 weight, scale, bias), so it loads with
    weights_only=True. Forward uses the quantized engine's dynamic int8 kernel on a packed
    copy built on first use (a runtime cache, never saved); where that kernel is missing it
    dequantizes the weight instead, which is correct but not faster.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple[tuple[Any, ...], Any] | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    def _cache_key(self) -> tuple[Any, ...]:
        tensors = [t for t in (self.weight, self.scale, self.bias) if t is not None]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def _packed_weight(self) -> Any:
        key = self._cache_key()
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, _pack_int8(self.weight, self.scale, self.bias))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        # torch.export traces the dequantizing path: the packed weight is an opaque engine
        # object a program cannot hold. The saved graph keeps the int8 weight and the scale.
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        packed = None if x.requires_grad or tracing else self._packed_weight()
        if packed is not None:
            return cast(torch.Tensor, torch.ops.quantized.linear_dynamic(x, packed, _REDUCE_RANGE))
        weight = self.weight.float() * self.scale[:, None]
        return nn.functional.linear(x, weight, self.bias)


# fbgemm/x86 multiply uint8 activations by int8 weights in int16 pairs; 7-bit activations
# keep those sums from saturating (the same choice torch's dynamic quantization makes).
_REDUCE_RANGE = torch.backends.quantized.engine in ("fbgemm", "x86")


def _pack_int8(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """The engine's packed int8 weight, or None where the quantized kernels are unavailable."""
    if weight.device.type != "cpu" or not hasattr(torch.ops.quantized, "linear_prepack"):
        return None
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    try:
        with warnings.catch_warnings():
            # torch 2.13 flags quantized-tensor creation as deprecated; the packed copy is
            # an in-process cache only, so the warning says nothing about saved files.
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                weight.detach(), scale.detach().double(), zero, 0
            )
            return torch.ops.quantized.linear_prepack(
                qweight, None if bias is None else bias.detach().float()
            )
    except (RuntimeError, AttributeError):
        return None


class Float16Linear(nn.Module):
    """A Linear with float16 weight and bias; it computes in float16 and returns float32."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        shape = (out_features, in_features)
        self.register_buffer("weight", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float16) if bias else None
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return out.float()
