"""Structured pruning of exported transformers: the feed-forward neurons go, the rest stays.

An exported attention block is written as linear -> view/unflatten to literal head widths
-> scaled_dot_product_attention (or q @ k^T) -> reshape -> linear, and the residual stream's
width is shared by the embeddings, every norm, every block's output projection and the
pooling. Torch-Pruning cannot slice through the literal head reshapes, and head pruning
would need the head count rewritten in the graph. What can be removed without touching
anything else is the hidden width between two Linear layers joined only by elementwise ops:
the FFN/MLP of each block (linear -> gelu -> linear), a written-out GELU (0.5 * x * (1 +
tanh(...))) and a gated MLP (silu(gate(x)) * up(x) -> down, gate and up pruned together).
Dropping hidden neuron j removes row j of each source layer and column j of the sink, so
the block's output width (the residual stream) and the model's output shape do not change.

Every other Linear is kept, and the plan says why: the logits, an attention projection (its
width is fixed by the head reshape), or a layer whose outputs join the residual stream.
`prune_structured` takes this path for a graph with attention; graphs without it go to
Torch-Pruning's dependency graph, which also prunes through residual adds.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from modules.errors import BadInputError

aten = torch.ops.aten

# Ops that keep their input's shape, element by element: a hidden neuron stays one neuron.
_ELEMENTWISE: frozenset[Any] = frozenset(
    {
        aten.relu.default,
        aten.relu_.default,
        aten.gelu.default,
        aten.silu.default,
        aten.silu_.default,
        aten.tanh.default,
        aten.sigmoid.default,
        aten.hardswish.default,
        aten.hardsigmoid.default,
        aten.leaky_relu.default,
        aten.elu.default,
        aten.mish.default,
        aten.softplus.default,
        aten.erf.default,
        aten.exp.default,
        aten.neg.default,
        aten.dropout.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.add.Tensor,
        aten.add.Scalar,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.mul.Scalar,
        aten.div.Tensor,
        aten.pow.Tensor_Scalar,
        aten.rsub.Scalar,
        operator.add,
        operator.mul,
    }
)
# Binary ops whose tensor operands must both be hidden-width tensors of the same pair.
_ATTENTION: frozenset[Any] = frozenset(
    {
        aten.scaled_dot_product_attention.default,
        aten._native_multi_head_attention.default,
        aten.matmul.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.einsum.default,
    }
)
# Ops that move a tensor's values around without mixing them: heads are cut out with these.
_SHAPE_OPS: frozenset[Any] = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten.unflatten.int,
        aten.flatten.using_ints,
        aten.transpose.int,
        aten.permute.default,
        aten.contiguous.default,
        aten.clone.default,
        aten.select.int,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.expand.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
        aten.slice.Tensor,
        aten.narrow.default,
        aten._unsafe_view.default,
        aten.mul.Tensor,
        aten.mul.Scalar,
        aten.div.Tensor,
        aten.add.Tensor,
        aten.dropout.default,
        operator.getitem,
    }
)
_SEARCH_DEPTH = 16


@dataclass(frozen=True)
class FfnGroup:
    """Hidden neurons shared by `sources` (their output rows) and `sink` (its input columns)."""

    sources: tuple[str, ...]
    sink: str
    width: int


@dataclass
class FfnPlan:
    """What prune_ffn will remove, and why every other weighted layer stays as it is."""

    groups: list[FfnGroup] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def _attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Calls that multiply two computed tensors (attention scores) or run attention itself."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _ATTENTION:
            continue
        tensors = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if node.target in (aten.matmul.default, aten.bmm.default) and len(tensors) < 2:
            continue  # x @ W with a stored W is a linear layer, not attention
        found.append(node)
    return found


def _raw_parameter_owners(module: nn.Module) -> list[str]:
    """Modules that hold parameters the graph uses directly (no layer module to slice)."""
    graph = module.graph if isinstance(module, fx.GraphModule) else None
    if graph is None:
        return []
    owners = {
        str(node.target).rpartition(".")[0] or "model"
        for node in graph.nodes
        if node.op == "get_attr" and node.users
    }
    return sorted(owners)


def graph_has_attention(module: nn.Module) -> bool:
    """Whether `module` is an exported graph with attention in it (SDPA, or q @ k^T)."""
    return isinstance(module, fx.GraphModule) and bool(_attention_nodes(module.graph))


def _linear_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
            calls.setdefault(str(node.target), []).append(node)
    return calls


def _linear(gm: nn.Module, name: str) -> nn.Linear:
    layer = gm.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{name} is a {type(layer).__name__}, not a Linear layer")
    return layer


def _is_linear_call(node: fx.Node, calls: Mapping[str, list[fx.Node]]) -> bool:
    return node.op == "call_module" and str(node.target) in calls


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return f"{node.op} {name}"


def _find_group(
    gm: fx.GraphModule, start: fx.Node, calls: Mapping[str, list[fx.Node]]
) -> tuple[FfnGroup | None, str]:
    """The FFN group whose hidden width `start` (a Linear call) emits, or why there is none.

    The region is every node reached from the sources through elementwise ops, up to one
    Linear that reads it; each region node may only read region nodes, sources and scalars.
    A Linear of the same width read by the region (a gated MLP's `up`) becomes a source too.
    """
    width = _linear(gm, str(start.target)).out_features
    sources = {start}
    region: set[fx.Node] = set()
    sink: fx.Node | None = None
    frontier = [start]
    while frontier:
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user in region or user in sources:
                    continue
                if _is_linear_call(user, calls) and user.args and user.args[0] is node:
                    if sink is not None and sink is not user:
                        return None, "its outputs feed more than one Linear layer"
                    sink = user
                    continue
                if user.op != "call_function" or user.target not in _ELEMENTWISE:
                    return None, f"its outputs feed {_describe(user)}, not only elementwise ops"
                region.add(user)
                frontier.append(user)
        for node in list(region):
            for arg in node.all_input_nodes:
                if arg in region or arg in sources:
                    continue
                other = gm.get_submodule(str(arg.target)) if _is_linear_call(arg, calls) else None
                if isinstance(other, nn.Linear) and other.out_features == width:
                    sources.add(arg)  # a gated MLP: gate and up share the hidden neurons
                    frontier.append(arg)
                    continue
                return None, f"its outputs are combined with {_describe(arg)}"
    if sink is None:
        return None, "its outputs reach the model's output without another Linear layer"
    sink_layer = _linear(gm, str(sink.target))
    if sink_layer.in_features != width:
        return None, f"the next Linear ({sink.target}) reads {sink_layer.in_features} features"
    for node in (*sources, sink):
        if len(calls[str(node.target)]) != 1:
            return None, f"layer {node.target} is called more than once (shared weights)"
    names = tuple(sorted(str(s.target) for s in sources))
    return FfnGroup(sources=names, sink=str(sink.target), width=width), ""


def _reaches(node: fx.Node, targets: set[fx.Node], *, forward: bool) -> bool:
    """Whether `node` reaches one of `targets` through shape ops (forward: along its users)."""
    seen: set[fx.Node] = set()
    frontier = [(node, 0)]
    while frontier:
        current, depth = frontier.pop()
        nexts = list(current.users) if forward else list(current.all_input_nodes)
        for other in nexts:
            if other in targets:
                return True
            if other in seen or depth >= _SEARCH_DEPTH:
                continue
            seen.add(other)
            if other.op == "call_function" and other.target in _SHAPE_OPS:
                frontier.append((other, depth + 1))
    return False


def _kept_reason(
    node: fx.Node, attention: set[fx.Node], group_reason: str, sinks: Mapping[str, str]
) -> str:
    name = str(node.target)
    if _reaches(node, attention, forward=True):
        return (
            "attention projection (query/key/value): the graph reshapes its outputs to literal "
            "head widths before attention, so they keep their width"
        )
    data = node.args[0] if node.args else None
    if isinstance(data, fx.Node) and _reaches(data, attention, forward=False):
        return (
            "attention output projection: it reads the heads at their literal width and its "
            "outputs join the residual stream"
        )
    if name in sinks:
        return f"its inputs follow {sinks[name]}; its outputs keep their width ({group_reason})"
    return f"{group_reason}: that width is shared beyond this layer"


def plan_ffn_pruning(
    gm: fx.GraphModule, *, classifier: str, skipped: frozenset[str] = frozenset()
) -> FfnPlan:
    """The FFN groups of a lifted graph, and a reason for every weighted layer that is kept.

    classifier: the layer that emits the logits (never a source).
    skipped: layers the user asked to keep (`layers`: "skip").
    """
    calls = _linear_calls(gm)
    attention = set(_attention_nodes(gm.graph))
    plan = FfnPlan()
    reasons: dict[str, str] = {}
    found: list[FfnGroup] = []
    for name, nodes in calls.items():
        if name == classifier:
            reasons[name] = "emits the logits (one output per class)"
            continue
        group, why = _find_group(gm, nodes[0], calls)
        if group is None:
            # A gated MLP's `up` is only found from `gate`; a later group may claim it.
            reasons[name] = why
        elif group not in found:
            found.append(group)
    for group in found:
        skipped_here = [s for s in group.sources if s in skipped]
        if skipped_here:
            for source in group.sources:
                reasons[source] = f"skipped by `layers` ({', '.join(skipped_here)})"
        else:
            plan.groups.append(group)
    sources = {s for g in plan.groups for s in g.sources}
    sinks = {g.sink: ", ".join(g.sources) for g in plan.groups}
    for name, nodes in calls.items():
        if name in sources:
            continue
        why = reasons.get(name, "")
        if name == classifier or why.startswith("skipped"):
            plan.kept[name] = why
            continue
        plan.kept[name] = _kept_reason(nodes[0], attention, why, sinks)
    for name, sub in gm.named_modules():
        if isinstance(sub, nn.Linear) or not list(sub.parameters(recurse=False)):
            continue
        if isinstance(sub, nn.LayerNorm | nn.Embedding | nn.BatchNorm1d | nn.BatchNorm2d):
            plan.kept[name] = f"{type(sub).__name__} on the residual stream, whose width is kept"
    for owner in _raw_parameter_owners(gm):
        plan.kept.setdefault(
            owner,
            "parameters the graph uses directly (e.g. a fused attention in_proj): no layer "
            "module to slice, kept whole",
        )
    return plan


def _neuron_scores(gm: fx.GraphModule, group: FfnGroup, p: int) -> torch.Tensor:
    """Magnitude importance of each hidden neuron: |rows| of the sources + |columns| of the sink."""
    score = torch.zeros(group.width)
    for name in group.sources:
        layer = _linear(gm, name)
        score += layer.weight.detach().abs().pow(p).sum(1).float()
        if layer.bias is not None:
            score += layer.bias.detach().abs().pow(p).float()
    score += _linear(gm, group.sink).weight.detach().abs().pow(p).sum(0).float()
    return score


def _n_keep(width: int, n_drop: int, round_to: int) -> int:
    keep = width - n_drop
    if round_to > 1:
        keep = min(width, math.ceil(keep / round_to) * round_to)
    return max(1, keep)


def _kept_indices(
    scores: list[torch.Tensor],
    amounts: list[float],
    *,
    scope: Literal["layer", "global"],
    round_to: int,
) -> list[torch.Tensor]:
    if scope == "global":
        # Each group's scores over its mean, as Torch-Pruning normalizes groups before ranking.
        normalized = [s / s.mean().clamp(min=1e-12) for s in scores]
        flat = torch.cat(normalized)
        n_drop = int(amounts[0] * flat.numel())
        threshold = flat.sort().values[n_drop - 1] if n_drop else -math.inf
        counts = [_n_keep(len(s), int((s <= threshold).sum()), round_to) for s in normalized]
    else:
        counts = [
            _n_keep(len(s), int(a * len(s)), round_to) for s, a in zip(scores, amounts, strict=True)
        ]
    return [
        torch.sort(torch.argsort(s, descending=True, stable=True)[:k]).values
        for s, k in zip(scores, counts, strict=True)
    ]


def _replace_linear(gm: fx.GraphModule, name: str, *, rows: Any = None, cols: Any = None) -> None:
    old = _linear(gm, name)
    weight = old.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None)
    new = new.to(dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach()[rows] if rows is not None else old.bias.detach())
    parent, _, child = name.rpartition(".")
    gm.get_submodule(parent).register_module(child, new)


def prune_ffn(
    gm: fx.GraphModule,
    *,
    amount: float,
    example_inputs: tuple[torch.Tensor, ...],
    classifier: str,
    importance: Literal["l1", "l2"] = "l1",
    scope: Literal["layer", "global"] = "layer",
    round_to: int = 1,
    overrides: Mapping[str, float | None] | None = None,
) -> tuple[fx.GraphModule, FfnPlan]:
    """`gm` (lifted, changed in place) with `amount` of each FFN group's hidden neurons removed.

    overrides: layer -> its own amount (None = skip), as structured_layer_amounts gives it; a
        group takes its first source's setting.
    """
    overrides = dict(overrides or {})
    skipped = frozenset(n for n, a in overrides.items() if a is None)
    plan = plan_ffn_pruning(gm, classifier=classifier, skipped=skipped)
    if not plan.groups:
        kept = "; ".join(f"{n}: {why}" for n, why in plan.kept.items())
        raise BadInputError(
            "structured pruning found nothing it can remove safely in this graph with attention "
            f"(it prunes the hidden neurons of Linear -> elementwise -> Linear pairs); kept {kept}"
        )
    with torch.no_grad():
        expected = gm(*example_inputs).shape
    amounts = [
        next((a for s in g.sources if (a := overrides.get(s)) is not None), amount)
        for g in plan.groups
    ]
    scores = [_neuron_scores(gm, g, 1 if importance == "l1" else 2) for g in plan.groups]
    if scope == "global" and any(a != amount for a in amounts):
        raise BadInputError("structured pruning: per-layer amounts need scope 'layer'")
    for group, keep in zip(
        plan.groups, _kept_indices(scores, amounts, scope=scope, round_to=round_to), strict=True
    ):
        for source in group.sources:
            _replace_linear(gm, source, rows=keep)
        _replace_linear(gm, group.sink, cols=keep)
    gm.recompile()
    with torch.no_grad():
        got = gm(*example_inputs).shape
    if got != expected:
        raise BadInputError(
            f"structured pruning changed the output shape from {list(expected)} to {list(got)}"
        )
    return gm, plan


def ffn_layer_report(plan: FfnPlan, before: nn.Module, after: nn.Module) -> dict[str, Any]:
    """The step record's account: each pruned layer's widths, each kept layer's reason."""
    pruned: dict[str, Any] = {}
    for group in plan.groups:
        for source in group.sources:
            pruned[source] = {
                "out_features": [
                    _linear(before, source).out_features,
                    _linear(after, source).out_features,
                ],
                "with": group.sink,
            }
        pruned[group.sink] = {
            "in_features": [
                _linear(before, group.sink).in_features,
                _linear(after, group.sink).in_features,
            ],
            "with": ", ".join(group.sources),
        }
    return {
        "structured_strategy": (
            "ffn: a graph with attention; the hidden neurons of Linear -> elementwise -> Linear "
            "groups are removed, every other layer is kept"
        ),
        "layers_pruned": pruned,
        "layers_kept": {n: why for n, why in plan.kept.items() if n not in pruned},
    }
