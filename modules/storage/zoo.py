"""The torch architecture registry and the exact, safe module-tree serialisation.

Every zoo model takes flat float32 input of shape (batch, in_features); image
models unflatten internally. A model is described either by a zoo arch
(`{"name": "mlp", "in_features": 64, "hidden": [128], "num_classes": 10}`) or by
a module tree (`{"name": "tree", "tree": {...}}`), the exact description of any
model built from allow-listed modules, including models changed by compression.

Tree nodes are plain dicts of JSON types:
  leaf:      {"type": "Linear", "in_features": 64, "out_features": 10, "bias": true}
  container: {"type": "Sequential", "children": {"0": node, "1": node}}
             {"type": "ResidualBlock", "children": {"conv1": ..., "bn1": ..., "conv2": ...,
                                                     "bn2": ..., "shortcut": ...}}
Every tree is validated and its parameter count bounded before anything is allocated.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from modules.errors import BadInputError, IncompatibleError, NotFoundError

MAX_PARAMS = 200_000_000
MAX_WIDTH = 65_536
MAX_LIST_LEN = 64
MAX_IMAGE_SIZE = 1024
MAX_KERNEL = 64
MAX_TREE_DEPTH = 32
MAX_CHILDREN = 4096
MAX_TREE_NODES = 100_000

_CHILD_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_RESIDUAL_CHILDREN = ("conv1", "bn1", "conv2", "bn2", "shortcut")
_REQUIRED = object()

Checker = Callable[[Any, str], Any]


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
        x = x.float()
        packed = None if x.requires_grad else self._packed_weight()
        if packed is not None:
            return cast(torch.Tensor, torch.ops.quantized.linear_dynamic(x, packed, _REDUCE_RANGE))
        weight = self.weight.float() * self.scale[:, None]
        return nn.functional.linear(x, weight, self.bias)


# fbgemm/x86 multiply uint8 activations by int8 weights in int16 pairs; 7-bit activations
# keep those sums from saturating (the same choice torch's dynamic quantization makes).
_REDUCE_RANGE = torch.backends.quantized.engine in ("fbgemm", "x86")


def _pack_int8(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """The engine's packed int8 weight, or None where the quantized kernels are unavailable."""
    import warnings

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


# --- value checkers: each returns the value in its canonical JSON form or raises ---------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(lo: int, hi: int) -> Checker:
    def check(value: Any, where: str) -> int:
        if not _is_int(value) or not lo <= value <= hi:
            raise BadInputError(f"{where}: expected an int in [{lo}, {hi}], got {_show(value)}")
        return int(value)

    return check


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise BadInputError(f"{where}: expected true or false, got {_show(value)}")
    return value


def _float_in(lo: float, hi: float, *, optional: bool = False) -> Checker:
    def check(value: Any, where: str) -> float | None:
        if value is None and optional:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            kind = "a number or null" if optional else "a number"
            raise BadInputError(f"{where}: expected {kind} in [{lo}, {hi}], got {_show(value)}")
        return float(value)

    return check


def _choice(*options: str) -> Checker:
    def check(value: Any, where: str) -> str:
        if value not in options:
            raise BadInputError(f"{where}: expected one of {list(options)}, got {_show(value)}")
        return str(value)

    return check


def _int_or_pair(lo: int, hi: int, *, words: tuple[str, ...] = ()) -> Checker:
    def check(value: Any, where: str) -> int | str | list[int]:
        if isinstance(value, str) and value in words:
            return value
        if _is_int(value) and lo <= value <= hi:
            return int(value)
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(_is_int(v) and lo <= v <= hi for v in value)
        ):
            return [int(v) for v in value]
        extra = f" or one of {list(words)}" if words else ""
        raise BadInputError(
            f"{where}: expected an int in [{lo}, {hi}] or a pair of them{extra}, got {_show(value)}"
        )

    return check


def _int_list(lo: int, hi: int, *, min_len: int, max_len: int) -> Checker:
    def check(value: Any, where: str) -> list[int]:
        if not isinstance(value, list | tuple) or not min_len <= len(value) <= max_len:
            raise BadInputError(
                f"{where}: expected a list of {min_len} to {max_len} ints, got {_show(value)}"
            )
        for i, item in enumerate(value):
            _int_in(lo, hi)(item, f"{where}[{i}]")
        return [int(v) for v in value]

    return check


def _optional(checker: Checker) -> Checker:
    def check(value: Any, where: str) -> Any:
        return None if value is None else checker(value, where)

    return check


def _output_size(value: Any, where: str) -> int | list[int | None]:
    if _is_int(value) and 1 <= value <= MAX_IMAGE_SIZE:
        return int(value)
    if isinstance(value, list | tuple) and len(value) == 2:
        return [
            _optional(_int_in(1, MAX_IMAGE_SIZE))(v, f"{where}[{i}]") for i, v in enumerate(value)
        ]
    raise BadInputError(
        f"{where}: expected an int in [1, {MAX_IMAGE_SIZE}] or a pair of them, got {_show(value)}"
    )


# --- the leaf allow-list -------------------------------------------------------------------------

_width = _int_in(1, MAX_WIDTH)
_kernel = _int_or_pair(1, MAX_KERNEL)
_padding = _int_or_pair(0, MAX_KERNEL)
_dim = _int_in(-8, 8)
_eps = _float_in(0.0, 1.0)


def _pair_area(value: int | list[int]) -> int:
    return value * value if isinstance(value, int) else value[0] * value[1]


def _count_linear(kw: dict[str, Any]) -> int:
    return kw["in_features"] * kw["out_features"] + (kw["out_features"] if kw["bias"] else 0)


def _count_conv(kw: dict[str, Any]) -> int:
    per_out = kw["in_channels"] // kw["groups"] * _pair_area(kw["kernel_size"])
    return kw["out_channels"] * per_out + (kw["out_channels"] if kw["bias"] else 0)


def _count_batchnorm(kw: dict[str, Any]) -> int:
    return (3 + int(kw["bias"])) * kw["num_features"]  # weight, bias, running mean and var


def _count_layernorm(kw: dict[str, Any]) -> int:
    if not kw["elementwise_affine"]:
        return 0
    return math.prod(kw["normalized_shape"]) * (2 if kw["bias"] else 1)


def _check_conv(kw: dict[str, Any], where: str) -> None:
    for name in ("in_channels", "out_channels"):
        if kw[name] % kw["groups"]:
            raise BadInputError(
                f"{where}.{name}: {kw[name]} is not divisible by groups={kw['groups']}"
            )
    if (
        isinstance(kw["padding"], str)
        and kw["padding"] == "same"
        and kw["stride"] not in (1, [1, 1])
    ):
        raise BadInputError(f"{where}.padding: 'same' padding needs stride 1")


def _check_maxpool(kw: dict[str, Any], where: str) -> None:
    if kw["return_indices"]:
        raise BadInputError(
            f"{where}.return_indices: must be false (a pool in a model returns a tensor)"
        )


@dataclass(frozen=True)
class _Leaf:
    cls: type[nn.Module]
    args: Mapping[str, tuple[Checker, Any]]
    count: Callable[[dict[str, Any]], int] | None = None
    cross_check: Callable[[dict[str, Any], str], None] | None = None


_BATCHNORM_ARGS: Mapping[str, tuple[Checker, Any]] = {
    "num_features": (_width, _REQUIRED),
    "eps": (_eps, 1e-5),
    "momentum": (_float_in(0.0, 1.0, optional=True), 0.1),
    "affine": (_bool, True),
    "track_running_stats": (_bool, True),
    "bias": (_bool, True),
}

_LEAVES: dict[str, _Leaf] = {
    "Linear": _Leaf(
        nn.Linear,
        {
            "in_features": (_width, _REQUIRED),
            "out_features": (_width, _REQUIRED),
            "bias": (_bool, True),
        },
        _count_linear,
    ),
    "Conv2d": _Leaf(
        nn.Conv2d,
        {
            "in_channels": (_width, _REQUIRED),
            "out_channels": (_width, _REQUIRED),
            "kernel_size": (_kernel, _REQUIRED),
            "stride": (_kernel, 1),
            "padding": (_int_or_pair(0, MAX_KERNEL, words=("same", "valid")), 0),
            "dilation": (_kernel, 1),
            "groups": (_width, 1),
            "bias": (_bool, True),
            "padding_mode": (_choice("zeros", "reflect", "replicate", "circular"), "zeros"),
        },
        _count_conv,
        _check_conv,
    ),
    "BatchNorm1d": _Leaf(nn.BatchNorm1d, _BATCHNORM_ARGS, _count_batchnorm),
    "BatchNorm2d": _Leaf(nn.BatchNorm2d, _BATCHNORM_ARGS, _count_batchnorm),
    "LayerNorm": _Leaf(
        nn.LayerNorm,
        {
            "normalized_shape": (_int_list(1, MAX_WIDTH, min_len=1, max_len=4), _REQUIRED),
            "eps": (_eps, 1e-5),
            "elementwise_affine": (_bool, True),
            "bias": (_bool, True),
        },
        _count_layernorm,
    ),
    "ReLU": _Leaf(nn.ReLU, {"inplace": (_bool, False)}),
    "GELU": _Leaf(nn.GELU, {"approximate": (_choice("none", "tanh"), "none")}),
    "Tanh": _Leaf(nn.Tanh, {}),
    "Sigmoid": _Leaf(nn.Sigmoid, {}),
    "Dropout": _Leaf(nn.Dropout, {"p": (_float_in(0.0, 1.0), 0.5), "inplace": (_bool, False)}),
    "Flatten": _Leaf(nn.Flatten, {"start_dim": (_dim, 1), "end_dim": (_dim, -1)}),
    "Unflatten": _Leaf(
        nn.Unflatten,
        {
            "dim": (_dim, _REQUIRED),
            "unflattened_size": (_int_list(1, MAX_WIDTH, min_len=1, max_len=4), _REQUIRED),
        },
    ),
    "MaxPool2d": _Leaf(
        nn.MaxPool2d,
        {
            "kernel_size": (_kernel, _REQUIRED),
            "stride": (_optional(_kernel), None),
            "padding": (_padding, 0),
            "dilation": (_kernel, 1),
            "return_indices": (_bool, False),
            "ceil_mode": (_bool, False),
        },
        cross_check=_check_maxpool,
    ),
    "AvgPool2d": _Leaf(
        nn.AvgPool2d,
        {
            "kernel_size": (_kernel, _REQUIRED),
            "stride": (_optional(_kernel), None),
            "padding": (_padding, 0),
            "ceil_mode": (_bool, False),
            "count_include_pad": (_bool, True),
            "divisor_override": (_optional(_int_in(1, MAX_WIDTH)), None),
        },
    ),
    "AdaptiveAvgPool2d": _Leaf(nn.AdaptiveAvgPool2d, {"output_size": (_output_size, _REQUIRED)}),
    "Identity": _Leaf(nn.Identity, {}),
    # Quantized linears of the quantize_dynamic step: plain int8 / float16 tensors only.
    "Int8Linear": _Leaf(
        Int8Linear,
        {
            "in_features": (_width, _REQUIRED),
            "out_features": (_width, _REQUIRED),
            "bias": (_bool, True),
        },
        _count_linear,
    ),
    "Float16Linear": _Leaf(
        Float16Linear,
        {
            "in_features": (_width, _REQUIRED),
            "out_features": (_width, _REQUIRED),
            "bias": (_bool, True),
        },
        _count_linear,
    ),
}
_LEAF_NAME_BY_CLASS: dict[type[nn.Module], str] = {leaf.cls: name for name, leaf in _LEAVES.items()}
_CONTAINERS = ("Sequential", "ResidualBlock")

LEAF_TYPES: tuple[str, ...] = tuple(_LEAVES)
CONTAINER_TYPES: tuple[str, ...] = _CONTAINERS


# --- tree -> module ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    type: str
    kwargs: dict[str, Any]
    children: tuple[tuple[str, _Plan], ...] = ()


@dataclass
class _Budget:
    nodes: int = 0
    params: int = 0


def _parse_leaf(node: Mapping[str, Any], type_name: str, where: str) -> tuple[dict[str, Any], int]:
    leaf = _LEAVES[type_name]
    unknown = sorted(set(node) - set(leaf.args) - {"type"})
    if unknown:
        raise BadInputError(
            f"{where}: {type_name} got unknown argument(s) {unknown}; allowed: {sorted(leaf.args)}"
        )
    kwargs: dict[str, Any] = {}
    for arg, (checker, default) in leaf.args.items():
        if arg in node:
            kwargs[arg] = checker(node[arg], f"{where}.{arg}")
        elif default is _REQUIRED:
            raise BadInputError(f"{where}: {type_name} is missing required argument '{arg}'")
        else:
            kwargs[arg] = default
    if leaf.cross_check is not None:
        leaf.cross_check(kwargs, where)
    return kwargs, leaf.count(kwargs) if leaf.count is not None else 0


def _parse_node(node: Any, *, where: str, depth: int, budget: _Budget) -> _Plan:
    if depth > MAX_TREE_DEPTH:
        raise BadInputError(f"{where}: module tree is nested deeper than {MAX_TREE_DEPTH} levels")
    budget.nodes += 1
    if budget.nodes > MAX_TREE_NODES:
        raise BadInputError(f"module tree has more than {MAX_TREE_NODES} nodes")
    if not isinstance(node, Mapping):
        raise BadInputError(
            f"{where}: expected a module node (a dict with 'type'), got {_show(node)}"
        )
    type_name = node.get("type")
    if type_name in _LEAVES:
        kwargs, params = _parse_leaf(node, type_name, where)
        budget.params += params
        if budget.params > MAX_PARAMS:
            raise BadInputError(
                f"model would have over {MAX_PARAMS:,} parameters (reached {budget.params:,} at "
                f"{where}); refusing to build it"
            )
        return _Plan(type_name, kwargs)
    if type_name not in _CONTAINERS:
        raise BadInputError(
            f"{where}: module type {_show(type_name)} is not allowed; allowed types: "
            f"{sorted(_LEAVES) + list(_CONTAINERS)}"
        )
    unknown = sorted(set(node) - {"type", "children"})
    if unknown:
        raise BadInputError(f"{where}: {type_name} takes only 'children', got also {unknown}")
    children = node.get("children", {})
    if isinstance(children, list | tuple):
        children = {str(i): child for i, child in enumerate(children)}
    if not isinstance(children, Mapping):
        raise BadInputError(
            f"{where}.children: expected a dict of name -> node, got {_show(children)}"
        )
    if len(children) > MAX_CHILDREN:
        raise BadInputError(f"{where}.children: more than {MAX_CHILDREN} children")
    for name in children:
        if not isinstance(name, str) or not _CHILD_NAME.match(name):
            raise BadInputError(
                f"{where}.children: bad child name {_show(name)} (letters, digits, _)"
            )
    if type_name == "ResidualBlock" and tuple(children) != _RESIDUAL_CHILDREN:
        raise BadInputError(
            f"{where}: ResidualBlock children must be exactly {list(_RESIDUAL_CHILDREN)} in that "
            f"order, got {list(children)}"
        )
    parsed = tuple(
        (name, _parse_node(child, where=f"{where}.{name}", depth=depth + 1, budget=budget))
        for name, child in children.items()
    )
    return _Plan(type_name, {}, parsed)


def _ctor_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _build(plan: _Plan, where: str) -> nn.Module:
    if plan.type == "Sequential":
        return nn.Sequential(
            OrderedDict((name, _build(child, f"{where}.{name}")) for name, child in plan.children)
        )
    if plan.type == "ResidualBlock":
        return ResidualBlock(
            **{name: _build(child, f"{where}.{name}") for name, child in plan.children}
        )
    kwargs = {k: _ctor_value(v) for k, v in plan.kwargs.items()}
    try:
        return _LEAVES[plan.type].cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadInputError(f"{where}: cannot build {plan.type}({kwargs}): {exc}") from exc


def module_from_tree(tree: Any) -> nn.Module:
    """Build a module from a module tree, validating it and bounding its size first."""
    plan = _parse_node(tree, where="tree", depth=0, budget=_Budget())
    return _build(plan, "tree")


def tree_param_count(tree: Any) -> int:
    """Parameters plus norm buffers a module tree would allocate, without allocating them."""
    budget = _Budget()
    _parse_node(tree, where="tree", depth=0, budget=budget)
    return budget.params


# --- module -> tree ------------------------------------------------------------------------------


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _refuse_hooks(module: nn.Module, where: str) -> None:
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._state_dict_hooks,
        module._load_state_dict_pre_hooks,
    )
    if any(hooks):
        raise BadInputError(
            f"{where} ({_type_name(module)}) has hooks attached (e.g. torch.nn.utils.prune "
            "reparametrisation); remove them before saving"
        )


def _leaf_to_node(module: nn.Module, type_name: str, where: str) -> dict[str, Any]:
    leaf = _LEAVES[type_name]
    raw = {
        arg: (module.bias is not None) if arg == "bias" else getattr(module, arg)
        for arg in leaf.args
    }
    kwargs, _ = _parse_leaf({"type": type_name, **raw}, type_name, where)
    if any(True for _ in module.children()):
        raise BadInputError(
            f"{where} ({type_name}) has child modules, which a {type_name} never has"
        )
    with torch.device("meta"):
        reference = _build(_Plan(type_name, kwargs), where)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if expected != actual:
        raise BadInputError(
            f"{where} ({type_name}) holds tensors {actual} but its constructor arguments "
            f"{kwargs} imply {expected}"
        )
    return {"type": type_name, **kwargs}


def _to_node(module: nn.Module, where: str, depth: int) -> dict[str, Any]:
    if depth > MAX_TREE_DEPTH:
        raise BadInputError(f"{where}: module is nested deeper than {MAX_TREE_DEPTH} levels")
    _refuse_hooks(module, where)
    cls = type(module)
    if cls in _LEAF_NAME_BY_CLASS:
        return _leaf_to_node(module, _LEAF_NAME_BY_CLASS[cls], where)
    if cls is nn.Sequential or cls is ResidualBlock:
        if module._parameters or module._buffers:
            raise BadInputError(f"{where} ({cls.__name__}) holds tensors directly; only leaves may")
        children = {
            name: _to_node(child, f"{where}.{name}", depth + 1)
            for name, child in module.named_children()
        }
        if cls is ResidualBlock and tuple(children) != _RESIDUAL_CHILDREN:
            raise BadInputError(f"{where}: ResidualBlock children are {list(children)}")
        return {"type": cls.__name__, "children": children}
    raise BadInputError(
        f"{where} is a {_type_name(module)}, which is not in the module allow-list "
        f"({sorted(_LEAVES) + list(_CONTAINERS)})"
    )


def module_to_tree(module: nn.Module) -> dict[str, Any]:
    """The exact module tree of `module`; any non-allow-listed module is a BadInputError."""
    return _to_node(module, "model", 0)


def arch_of(module: nn.Module) -> dict[str, Any]:
    """The arch that rebuilds `module` exactly: `{"name": "tree", "tree": <its module tree>}`."""
    return {"name": "tree", "tree": module_to_tree(module)}


# --- zoo builders --------------------------------------------------------------------------------


def _linear(in_features: int, out_features: int) -> dict[str, Any]:
    return {"type": "Linear", "in_features": in_features, "out_features": out_features}


def _conv(in_channels: int, out_channels: int, *, kernel: int, stride: int) -> dict[str, Any]:
    return {
        "type": "Conv2d",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": kernel,
        "stride": stride,
        "padding": kernel // 2,
        "bias": False,
    }


def _bn2d(num_features: int) -> dict[str, Any]:
    return {"type": "BatchNorm2d", "num_features": num_features}


def _unflatten(in_channels: int, image_size: int) -> dict[str, Any]:
    return {
        "type": "Unflatten",
        "dim": 1,
        "unflattened_size": [in_channels, image_size, image_size],
    }


def _head(in_features: int, num_classes: int) -> list[dict[str, Any]]:
    return [
        {"type": "AdaptiveAvgPool2d", "output_size": 1},
        {"type": "Flatten"},
        _linear(in_features, num_classes),
    ]


def _sequential(layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "Sequential", "children": {str(i): layer for i, layer in enumerate(layers)}}


_image_size = _int_in(1, MAX_IMAGE_SIZE)
_widths = _int_list(1, MAX_WIDTH, min_len=1, max_len=MAX_LIST_LEN)


def mlp(*, in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    """Linear, ReLU, ..., Linear."""
    sizes = [
        _width(in_features, "mlp.in_features"),
        *_int_list(1, MAX_WIDTH, min_len=0, max_len=MAX_LIST_LEN)(hidden, "mlp.hidden"),
        _width(num_classes, "mlp.num_classes"),
    ]
    layers: list[dict[str, Any]] = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append({"type": "ReLU"})
        layers.append(_linear(sizes[i], sizes[i + 1]))
    return cast(nn.Sequential, module_from_tree(_sequential(layers)))


def cnn(
    *, in_channels: int, image_size: int, channels: list[int], num_classes: int
) -> nn.Sequential:
    """Unflatten, [conv3x3-bn-relu, maxpool(2) while the side is >= 4]..., pool, flatten, linear."""
    c_in = _width(in_channels, "cnn.in_channels")
    size = _image_size(image_size, "cnn.image_size")
    stages = _widths(channels, "cnn.channels")
    classes = _width(num_classes, "cnn.num_classes")
    layers = [_unflatten(c_in, size)]
    for c_out in stages:
        layers += [_conv(c_in, c_out, kernel=3, stride=1), _bn2d(c_out), {"type": "ReLU"}]
        if size >= 4:
            layers.append({"type": "MaxPool2d", "kernel_size": 2})
            size //= 2
        c_in = c_out
    return cast(nn.Sequential, module_from_tree(_sequential(layers + _head(c_in, classes))))


def _residual_block(in_channels: int, out_channels: int, *, stride: int) -> dict[str, Any]:
    if stride != 1 or in_channels != out_channels:
        shortcut = _sequential(
            [_conv(in_channels, out_channels, kernel=1, stride=stride), _bn2d(out_channels)]
        )
    else:
        shortcut = {"type": "Identity"}
    return {
        "type": "ResidualBlock",
        "children": {
            "conv1": _conv(in_channels, out_channels, kernel=3, stride=stride),
            "bn1": _bn2d(out_channels),
            "conv2": _conv(out_channels, out_channels, kernel=3, stride=1),
            "bn2": _bn2d(out_channels),
            "shortcut": shortcut,
        },
    }


def resnet(
    *, in_channels: int, image_size: int, widths: list[int], blocks: list[int], num_classes: int
) -> nn.Sequential:
    """Unflatten, stem conv-bn-relu, stages of ResidualBlocks (stride 2 between stages), head."""
    c_in = _width(in_channels, "resnet.in_channels")
    size = _image_size(image_size, "resnet.image_size")
    stage_widths = _widths(widths, "resnet.widths")
    stage_blocks = _int_list(1, MAX_LIST_LEN, min_len=1, max_len=MAX_LIST_LEN)(
        blocks, "resnet.blocks"
    )
    classes = _width(num_classes, "resnet.num_classes")
    if len(stage_blocks) != len(stage_widths):
        raise BadInputError(
            f"resnet.blocks: has {len(stage_blocks)} entries but resnet.widths has "
            f"{len(stage_widths)}; give one block count per stage"
        )
    layers = [
        _unflatten(c_in, size),
        _conv(c_in, stage_widths[0], kernel=3, stride=1),
        _bn2d(stage_widths[0]),
        {"type": "ReLU"},
    ]
    c_in = stage_widths[0]
    for stage, (width, count) in enumerate(zip(stage_widths, stage_blocks, strict=True)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 and size >= 4 else 1
            layers.append(_residual_block(c_in, width, stride=stride))
            size = (size + 1) // 2 if stride == 2 else size
            c_in = width
    return cast(nn.Sequential, module_from_tree(_sequential(layers + _head(c_in, classes))))


def sequential(layers: list[dict[str, Any]]) -> nn.Sequential:
    """An nn.Sequential of allow-listed layers, each like `{"type": "ReLU"}`."""
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_CHILDREN:
        raise BadInputError(
            f"sequential.layers: expected a list of 1 to {MAX_CHILDREN} layer dicts, "
            f"got {_show(layers)}"
        )
    return cast(nn.Sequential, module_from_tree(_sequential(layers)))


_ARCH_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet": resnet,
    "sequential": sequential,
    "tree": module_from_tree,
}
ARCH_NAMES: tuple[str, ...] = tuple(_ARCH_BUILDERS)
_IMAGE_ARCHS = ("cnn", "resnet")


def _arch_name(arch: Any) -> str:
    if not isinstance(arch, Mapping):
        raise BadInputError(f"arch: expected a dict with a 'name', got {_show(arch)}")
    name = arch.get("name")
    if name not in _ARCH_BUILDERS:
        raise NotFoundError(f"unknown arch {_show(name)}; known archs: {', '.join(ARCH_NAMES)}")
    return str(name)


def arch_kwargs(name: str) -> tuple[str, ...]:
    """The kwargs an arch takes beside its name."""
    if name not in _ARCH_BUILDERS:
        raise NotFoundError(f"unknown arch {_show(name)}; known archs: {', '.join(ARCH_NAMES)}")
    return tuple(inspect.signature(_ARCH_BUILDERS[name]).parameters)


def build_model(arch: Mapping[str, Any]) -> nn.Module:
    """Build a fresh model from a zoo arch or a module tree arch."""
    name = _arch_name(arch)
    expected = arch_kwargs(name)
    given = {k: v for k, v in arch.items() if k != "name"}
    unknown = sorted(str(k) for k in set(given) - set(expected))
    if unknown:
        raise BadInputError(
            f"arch '{name}' got unknown kwarg(s) {unknown}; it takes {', '.join(expected)}"
        )
    missing = [k for k in expected if k not in given]
    if missing:
        raise BadInputError(f"arch '{name}' is missing kwarg(s) {', '.join(missing)}")
    return _ARCH_BUILDERS[name](**given)


def complete_arch(
    arch: Mapping[str, Any],
    *,
    in_features: int,
    num_classes: int,
    image_shape: tuple[int, int, int] | None,
) -> dict[str, Any]:
    """Fill in the kwargs a dataset gives: in_features, num_classes, in_channels, image_size."""
    name = _arch_name(arch)
    done = dict(arch)
    if name in ("sequential", "tree"):
        return done
    wanted: dict[str, int] = {"num_classes": num_classes}
    if name in _IMAGE_ARCHS:
        if image_shape is None:
            raise BadInputError(
                f"arch '{name}' needs image data (channels, height, width); this dataset has "
                f"{in_features} flat features, so use 'mlp'"
            )
        channels, height, width = image_shape
        if height != width:
            raise BadInputError(f"arch '{name}' needs square images, got {height}x{width}")
        if channels * height * width != in_features:
            raise IncompatibleError(
                f"image shape {image_shape} has {channels * height * width} values but the "
                f"dataset has {in_features} features"
            )
        wanted.update(in_channels=channels, image_size=height)
    else:
        wanted["in_features"] = in_features
    for key, value in wanted.items():
        if key not in done:
            done[key] = value
        elif done[key] != value:
            raise IncompatibleError(
                f"arch '{name}' sets {key}={_show(done[key])} but the dataset has {key}={value}"
            )
    return done


# --- the bring-your-own-ONNX test transformer ----------------------------------------------------
# Not a tree arch: it reads token ids and an attention mask instead of flat float features, so
# it never goes through build_model or the .pt format (its modules stay off the allow-list).
# Its one job is to produce an ONNX file with named integer inputs and an embedding output
# (`text_encoder_onnx`), which tests, the demo and the benchmark upload as a BYO model.

TEXT_ENCODER_INPUTS = ("input_ids", "attention_mask")
TEXT_ENCODER_OUTPUT = "embedding"


class EncoderBlock(nn.Module):
    """Pre-norm multi-head self-attention, then a GELU feed-forward; each with a residual."""

    def __init__(self, *, dim: int, heads: int, ff_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, ff_dim)
        self.ff_out = nn.Linear(ff_dim, dim)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = (self._heads(proj(h)) for proj in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5) + mask_bias
        context = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)
        x = x + self.out(context)
        return x + self.ff_out(nn.functional.gelu(self.ff_in(self.norm2(x))))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class TextEncoder(nn.Module):
    """Token and position embeddings, encoder blocks, a final norm, masked mean pooling."""

    def __init__(
        self, *, vocab_size: int, max_len: int, dim: int, heads: int, layers: int, ff_dim: int
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim=dim, heads=heads, ff_dim=ff_dim) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        keep = attention_mask.to(x.dtype)
        # Padded keys get a large negative score, so softmax gives them ~0 weight.
        mask_bias = ((1.0 - keep) * -1e4)[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask_bias)
        x = self.norm(x)
        summed = (x * keep[:, :, None]).sum(dim=1)
        return summed / keep.sum(dim=1, keepdim=True).clamp(min=1.0)


def _scale_rows(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.mul_(scale[:, None])
    if linear.bias is not None:
        linear.bias.mul_(scale)


def text_encoder(
    *,
    vocab_size: int = 256,
    max_len: int = 32,
    dim: int = 32,
    heads: int = 2,
    layers: int = 2,
    ff_dim: int = 64,
    channel_spread: float = 0.0,
    seed: int = 0,
) -> TextEncoder:
    """A seeded TextEncoder in eval mode.

    channel_spread: sigma of log-normal per-channel scales moved between the attention
    projections without changing the function: query rows x s and key rows / s (q.k is the
    same), value rows x t and the output projection's columns / t. Trained transformers have
    such outlier channels, and they are what makes naive int8 lose precision; 0 keeps
    PyTorch's default init.
    """
    kwargs = {
        "vocab_size": _int_in(2, 1_000_000)(vocab_size, "text_encoder.vocab_size"),
        "max_len": _int_in(1, 65_536)(max_len, "text_encoder.max_len"),
        "dim": _width(dim, "text_encoder.dim"),
        "heads": _int_in(1, 1024)(heads, "text_encoder.heads"),
        "layers": _int_in(1, MAX_LIST_LEN)(layers, "text_encoder.layers"),
        "ff_dim": _width(ff_dim, "text_encoder.ff_dim"),
    }
    spread = _float_in(0.0, 4.0)(channel_spread, "text_encoder.channel_spread")
    if kwargs["dim"] % kwargs["heads"]:
        raise BadInputError(f"text_encoder.dim: {dim} is not divisible by heads={heads}")
    params = (vocab_size + max_len) * dim + layers * (4 * dim * dim + 2 * dim * ff_dim)
    if params > MAX_PARAMS:
        raise BadInputError(f"text_encoder would have about {params:,} parameters; over the cap")
    torch.manual_seed(seed)
    model = TextEncoder(**kwargs)
    if spread:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for block in cast(list[EncoderBlock], list(model.blocks)):
                s_qk = (torch.randn(kwargs["dim"], generator=gen) * spread).exp()
                s_vo = (torch.randn(kwargs["dim"], generator=gen) * spread).exp()
                _scale_rows(block.query, s_qk)
                _scale_rows(block.key, 1.0 / s_qk)
                _scale_rows(block.value, s_vo)
                block.out.weight.div_(s_vo[None, :])
    return model.eval()


def text_encoder_inputs(
    *, rows: int, seq_len: int, vocab_size: int, seed: int = 0
) -> dict[str, Any]:
    """Seeded token ids and attention masks (each row 4..seq_len tokens long, then padding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(rows, seq_len), dtype=np.int64)
    lengths = rng.integers(min(4, seq_len), seq_len + 1, size=rows)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def text_encoder_onnx(model: TextEncoder, *, opset: int = 17) -> bytes:
    """ONNX bytes: int64 input_ids, attention_mask (batch, seq) -> float embedding (batch, dim)."""
    import io
    import warnings

    # Tracing needs an example; batch and sequence length stay dynamic in the graph.
    seq_len = min(8, model.positions.num_embeddings)
    example = text_encoder_inputs(rows=2, seq_len=seq_len, vocab_size=model.tokens.num_embeddings)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation on every call.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            tuple(torch.from_numpy(example[name]) for name in TEXT_ENCODER_INPUTS),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
            dynamo=False,
            opset_version=opset,
            input_names=list(TEXT_ENCODER_INPUTS),
            output_names=[TEXT_ENCODER_OUTPUT],
            dynamic_axes={
                **{name: {0: "batch", 1: "seq"} for name in TEXT_ENCODER_INPUTS},
                TEXT_ENCODER_OUTPUT: {0: "batch"},
            },
        )
    return buf.getvalue()
