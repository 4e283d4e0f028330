"""Layer modules back into an exported graph, so module-level techniques see its layers.

`ExportedProgram.module()` (what a `.pt2` upload becomes) is a GraphModule whose layers are
ATen calls on parameters, `aten.linear(x, stem.weight, stem.bias)`, not `nn.Linear`
modules: Torch-Pruning, low-rank factorization and dynamic quantization find nothing to
work on, and the module refuses `train()`/`eval()`. `lift_layers` rebuilds it as a plain
`torch.fx.GraphModule` (whose train()/eval() work) in which each linear, conv2d,
batch_norm, layer_norm and embedding call is a call to a real layer module at the
parameters' own path (`stem` becomes an `nn.Linear` holding the same `stem.weight`), so
state_dict keys do not change and the layers' shapes are no longer constants of the
graph. Any other module is returned as is.

The graph's shape arithmetic is also made visible to the TorchScript tracer that the ONNX
export uses: an exported graph reads sizes with `aten.sym_size.int` and reshapes with
`aten.view.default(x, [s0, s1 * 2, 8])`, and the tracer records those ints as constants, so
an exported attention block exported to ONNX only ran at the batch and length it was traced
with. `x.size(d)` and the tensor methods `view`/`reshape`/`expand`, and `torch.arange`, are
what the tracer follows: the lifted graph calls those instead (same values in eager mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from modules.storage.layers import Float16Linear, Int8Linear

aten = torch.ops.aten


def _const(node: Any, index: int, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else default


def _linear(node: Any, p: list[Any]) -> nn.Module:
    weight, bias = p[0], p[1] if len(p) > 1 else None
    if weight.dtype == torch.float16 and not isinstance(weight, nn.Parameter):
        # A stored quantize_dynamic(float16) program: its buffers go back into the layer.
        half = Float16Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        half.weight, half.bias = weight, bias
        return half
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _conv2d(node: Any, p: list[Any]) -> nn.Module:
    weight, bias = p[0], p[1] if len(p) > 1 else None
    groups = int(_const(node, 6, 1))
    layer = nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(_const(node, 3, [1, 1])),
        padding=tuple(_const(node, 4, [0, 0])),
        dilation=tuple(_const(node, 5, [1, 1])),
        groups=groups,
        bias=bias is not None,
    )
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _batch_norm(node: Any, p: list[Any]) -> nn.Module:
    weight, bias, mean, var = p
    layer = nn.BatchNorm2d(weight.shape[0], eps=float(_const(node, 7, 1e-5)))
    layer.weight, layer.bias = weight, bias
    layer.running_mean, layer.running_var = mean, var
    return layer


def _layer_norm(node: Any, p: list[Any]) -> nn.Module:
    weight, bias = p[0], p[1] if len(p) > 1 else None
    layer = nn.LayerNorm(
        list(node.args[1]), eps=float(_const(node, 4, 1e-5)), bias=bias is not None
    )
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _embedding(node: Any, p: list[Any]) -> nn.Module:
    layer = nn.Embedding(p[0].shape[0], p[0].shape[1])
    layer.weight = p[0]
    return layer


# op -> (positions of the parameter args, position of the data input, builder)
_LAYERS: dict[Any, tuple[tuple[int, ...], int, Callable[[Any, list[Any]], nn.Module]]] = {
    aten.linear.default: ((1, 2), 0, _linear),
    aten.conv2d.default: ((1, 2), 0, _conv2d),
    aten.batch_norm.default: ((1, 2, 3, 4), 0, _batch_norm),
    aten.layer_norm.default: ((2, 3), 0, _layer_norm),
    aten.embedding.default: ((0,), 1, _embedding),
}


def _dequantized_int8(node: Any) -> tuple[Any, Any] | None:
    """(int8 weight, scale) get_attr nodes when `node` is Int8Linear's traced weight.

    Int8Linear exports as linear(x, weight.to(float32) * scale.unsqueeze(1), bias): a .pt2
    written after quantize_dynamic keeps the int8 tensors, and lifting turns the pattern
    back into an Int8Linear (with its int8 kernel) instead of a float32 computation.
    """
    if not (isinstance(node, fx.Node) and node.target is aten.mul.Tensor and len(node.args) == 2):
        return None
    cast_node, unsqueeze = node.args
    if not (isinstance(cast_node, fx.Node) and isinstance(unsqueeze, fx.Node)):
        return None
    if cast_node.target is not aten.to.dtype or unsqueeze.target is not aten.unsqueeze.default:
        return None
    weight, scale = cast_node.args[0], unsqueeze.args[0]
    if cast_node.args[1:] != (torch.float32,) or unsqueeze.args[1:] not in ((1,), (-1,)):
        return None
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (weight, scale)):
        return None
    return weight, scale


def _lift_int8(module: fx.GraphModule, node: Any) -> bool:
    """Replace a traced Int8Linear call by the layer module; False when the pattern is absent."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return False
    found = _dequantized_int8(node.args[1] if len(node.args) > 1 else None)
    if found is None:
        return False
    bias = node.args[2] if len(node.args) > 2 else None
    attrs = [*found, *([bias] if bias is not None else [])]
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return False
    owner = _owner([str(a.target) for a in attrs])
    if not owner:
        return False
    holder = module.get_submodule(owner)
    tensors = {n: t for n, t in holder.named_buffers(recurse=False)}
    tensors |= {n: t for n, t in holder.named_parameters(recurse=False)}
    if list(holder.children()) or set(tensors) != {str(a.target).rpartition(".")[2] for a in attrs}:
        return False
    weight = tensors["weight"]
    if weight.dtype != torch.int8 or weight.dim() != 2:
        return False
    layer = Int8Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight, layer.scale = weight, tensors["scale"]
    if bias is not None:
        layer.bias = tensors["bias"]
    parent, _, child = owner.rpartition(".")
    module.get_submodule(parent).register_module(child, layer)
    graph = module.graph
    with graph.inserting_before(node):
        call = graph.call_module(owner, (node.args[0],))
    node.replace_all_uses_with(call)
    dequantize = node.args[1]
    graph.erase_node(node)
    for dead in (dequantize, *dequantize.args):
        if isinstance(dead, fx.Node) and not dead.users and dead.op == "call_function":
            graph.erase_node(dead)
    return True


def _owner(targets: list[str]) -> str | None:
    """The module path all of a call's parameters live under (`stem` of stem.weight)."""
    owners = {t.rpartition(".")[0] for t in targets}
    return owners.pop() if len(owners) == 1 else None


# Ops whose size arguments the tracer bakes when called as ATen overloads -> tensor methods.
_SIZE_METHODS: dict[Any, str] = {
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten._unsafe_view.default: "reshape",
    aten.expand.default: "expand",
}
_ARANGE = (aten.arange.default, aten.arange.start, aten.arange.start_step)


def _computed(value: Any) -> bool:
    """Whether an argument holds a graph value (a size read from an input), not literals."""
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, list | tuple) and any(_computed(v) for v in value)


def traceable_shapes(graph: fx.Graph) -> None:
    """Rewrite size reads and size-taking calls to the forms the TorchScript tracer follows."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        replacement: tuple[str, Any, tuple[Any, ...], dict[str, Any]]
        if node.target is aten.sym_size.int:
            replacement = ("call_method", "size", node.args, {})
        elif node.target in _SIZE_METHODS and _computed(node.args[1:]):
            replacement = ("call_method", _SIZE_METHODS[node.target], node.args, dict(node.kwargs))
        elif node.target in _ARANGE and _computed(node.args):
            kwargs = {k: v for k, v in node.kwargs.items() if k != "pin_memory"}
            replacement = ("call_function", torch.arange, node.args, kwargs)
        else:
            continue
        op, target, args, kwargs = replacement
        with graph.inserting_before(node):
            new = graph.create_node(op, target, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def lift_layers(module: nn.Module) -> nn.Module:
    """A copy of an exported GraphModule with its layer calls as layer modules; others as is."""
    if not isinstance(module, fx.GraphModule):
        return module
    module = copy.deepcopy(module)
    graph = module.graph
    for node in list(graph.nodes):
        if _lift_int8(module, node):
            continue
        rule = _LAYERS.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        positions, data_at, build = rule
        attrs = [node.args[i] if len(node.args) > i else None for i in positions]
        present = [a for a in attrs if a is not None]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in present):
            continue  # a layer fed computed weights stays a function call
        if node.target is aten.batch_norm.default and (len(present) != 4 or node.args[5]):
            continue
        owner = _owner([str(a.target) for a in present])
        if not owner:
            continue
        holder = module.get_submodule(owner)
        names = {str(a.target).rpartition(".")[2] for a in present}
        held = {n for n, _ in holder.named_parameters(recurse=False)}
        held |= {n for n, _ in holder.named_buffers(recurse=False)} - {"num_batches_tracked"}
        if list(holder.children()) or held != names:
            continue  # the path holds more than this layer (MultiheadAttention's in_proj)
        try:
            layer = build(
                node, [getattr(holder, str(a.target).rpartition(".")[2]) for a in present]
            )
        except TypeError:
            continue  # buffers where the layer holds parameters: the call stays a function
        parent, _, child = owner.rpartition(".")
        module.get_submodule(parent).register_module(child, layer)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (node.args[data_at],))
            if isinstance(layer, Float16Linear):
                # The graph's linear returned float16 (the layer returns float32): the same
                # values, cast back, so its dtype checks and casts after it still hold.
                call = graph.call_method("half", (call,))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    traceable_shapes(graph)
    rebuilt = fx.GraphModule(module, graph)
    rebuilt.eval()
    return rebuilt
