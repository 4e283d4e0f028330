"""The module-tree format: the exact, safe description of a torch model as JSON.

A module tree describes any model built from allow-listed modules, including models changed
by compression; `arch_of` wraps it as the arch `{"name": "tree", "tree": {...}}`.

Tree nodes are plain dicts of JSON types:
  leaf:      {"type": "Linear", "in_features": 64, "out_features": 10, "bias": true}
  container: {"type": "Sequential", "children": {"0": node, "1": node}}
             {"type": "ResidualBlock", "children": {"conv1": ..., "bn1": ..., "conv2": ...,
                                                     "bn2": ..., "shortcut": ...}}
Every tree is validated and its parameter count bounded before anything is allocated.
The value checkers (`int_in`, `int_list`, `check_width`, `float_in`, `show`) are shared with
the architecture builders, which check their kwargs by the same rules.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modules.errors import BadInputError
from modules.storage.layers import Float16Linear, Int8Linear, ResidualBlock

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


# --- value checkers: each returns the value in its canonical JSON form or raises ---------------


def show(value: Any) -> str:
    """`repr(value)`, clipped to 80 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_in(lo: int, hi: int) -> Checker:
    """A checker for an int (not a bool) in [lo, hi]."""

    def check(value: Any, where: str) -> int:
        if not _is_int(value) or not lo <= value <= hi:
            raise BadInputError(f"{where}: expected an int in [{lo}, {hi}], got {show(value)}")
        return int(value)

    return check


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise BadInputError(f"{where}: expected true or false, got {show(value)}")
    return value


def float_in(lo: float, hi: float, *, optional: bool = False) -> Checker:
    """A checker for a finite number in [lo, hi] (or None where optional)."""

    def check(value: Any, where: str) -> float | None:
        if value is None and optional:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            kind = "a number or null" if optional else "a number"
            raise BadInputError(f"{where}: expected {kind} in [{lo}, {hi}], got {show(value)}")
        return float(value)

    return check


def _choice(*options: str) -> Checker:
    def check(value: Any, where: str) -> str:
        if value not in options:
            raise BadInputError(f"{where}: expected one of {list(options)}, got {show(value)}")
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
            f"{where}: expected an int in [{lo}, {hi}] or a pair of them{extra}, got {show(value)}"
        )

    return check


def int_list(lo: int, hi: int, *, min_len: int, max_len: int) -> Checker:
    """A checker for a list of min_len to max_len ints, each in [lo, hi]."""

    def check(value: Any, where: str) -> list[int]:
        if not isinstance(value, list | tuple) or not min_len <= len(value) <= max_len:
            raise BadInputError(
                f"{where}: expected a list of {min_len} to {max_len} ints, got {show(value)}"
            )
        for i, item in enumerate(value):
            int_in(lo, hi)(item, f"{where}[{i}]")
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
            _optional(int_in(1, MAX_IMAGE_SIZE))(v, f"{where}[{i}]") for i, v in enumerate(value)
        ]
    raise BadInputError(
        f"{where}: expected an int in [1, {MAX_IMAGE_SIZE}] or a pair of them, got {show(value)}"
    )


# --- the leaf allow-list -------------------------------------------------------------------------

check_width = int_in(1, MAX_WIDTH)
_kernel = _int_or_pair(1, MAX_KERNEL)
_padding = _int_or_pair(0, MAX_KERNEL)
_dim = int_in(-8, 8)
_eps = float_in(0.0, 1.0)


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
    "num_features": (check_width, _REQUIRED),
    "eps": (_eps, 1e-5),
    "momentum": (float_in(0.0, 1.0, optional=True), 0.1),
    "affine": (_bool, True),
    "track_running_stats": (_bool, True),
    "bias": (_bool, True),
}

_LEAVES: dict[str, _Leaf] = {
    "Linear": _Leaf(
        nn.Linear,
        {
            "in_features": (check_width, _REQUIRED),
            "out_features": (check_width, _REQUIRED),
            "bias": (_bool, True),
        },
        _count_linear,
    ),
    "Conv2d": _Leaf(
        nn.Conv2d,
        {
            "in_channels": (check_width, _REQUIRED),
            "out_channels": (check_width, _REQUIRED),
            "kernel_size": (_kernel, _REQUIRED),
            "stride": (_kernel, 1),
            "padding": (_int_or_pair(0, MAX_KERNEL, words=("same", "valid")), 0),
            "dilation": (_kernel, 1),
            "groups": (check_width, 1),
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
            "normalized_shape": (int_list(1, MAX_WIDTH, min_len=1, max_len=4), _REQUIRED),
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
    "Dropout": _Leaf(nn.Dropout, {"p": (float_in(0.0, 1.0), 0.5), "inplace": (_bool, False)}),
    "Flatten": _Leaf(nn.Flatten, {"start_dim": (_dim, 1), "end_dim": (_dim, -1)}),
    "Unflatten": _Leaf(
        nn.Unflatten,
        {
            "dim": (_dim, _REQUIRED),
            "unflattened_size": (int_list(1, MAX_WIDTH, min_len=1, max_len=4), _REQUIRED),
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
            "divisor_override": (_optional(int_in(1, MAX_WIDTH)), None),
        },
    ),
    "AdaptiveAvgPool2d": _Leaf(nn.AdaptiveAvgPool2d, {"output_size": (_output_size, _REQUIRED)}),
    "Identity": _Leaf(nn.Identity, {}),
    # Quantized linears of the quantize_dynamic step: plain int8 / float16 tensors only.
    "Int8Linear": _Leaf(
        Int8Linear,
        {
            "in_features": (check_width, _REQUIRED),
            "out_features": (check_width, _REQUIRED),
            "bias": (_bool, True),
        },
        _count_linear,
    ),
    "Float16Linear": _Leaf(
        Float16Linear,
        {
            "in_features": (check_width, _REQUIRED),
            "out_features": (check_width, _REQUIRED),
            "bias": (_bool, True),
        },
        _count_linear,
    ),
}
_LEAF_NAME_BY_CLASS: dict[type[nn.Module], str] = {leaf.cls: name for name, leaf in _LEAVES.items()}
_CONTAINERS = ("Sequential", "ResidualBlock")

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
            f"{where}: expected a module node (a dict with 'type'), got {show(node)}"
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
            f"{where}: module type {show(type_name)} is not allowed; allowed types: "
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
            f"{where}.children: expected a dict of name -> node, got {show(children)}"
        )
    if len(children) > MAX_CHILDREN:
        raise BadInputError(f"{where}.children: more than {MAX_CHILDREN} children")
    for name in children:
        if not isinstance(name, str) or not _CHILD_NAME.match(name):
            raise BadInputError(
                f"{where}.children: bad child name {show(name)} (letters, digits, _)"
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
