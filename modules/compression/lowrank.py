"""Low-rank factorization: W ~ U V by truncated SVD, for Linear (and optionally Conv2d) layers.

A Linear(in, out) of rank r becomes Sequential(Linear(in, r, bias=False), Linear(r, out)),
with sqrt(S) split between the two factors. A Conv2d(in, out, k x k) becomes a k x k
Conv2d(in, r) followed by a 1 x 1 Conv2d(r, out) (channel decomposition of the weight
reshaped to out x (in*k*k)). The rank is the smallest that keeps `energy` of the squared
singular values, or a fixed `ratio` of the full rank. A layer is replaced only when the
factors hold fewer parameters than the original; everything stays in the zoo's allow-list.

CLI: python -m modules.compression.lowrank --input-model in.pt --output-model out.pt
     --energy 0.9 | --ratio 0.25 [--conv]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from pydantic import ConfigDict, Field
from torch import nn

from modules.compression.layer_select import (
    LayerChoice,
    LayerControlFields,
    check_layer_settings,
    describe_choices,
    int_at_least,
    layers_field,
    number_in,
    resolve_layers,
)
from modules.compression.scaffold import Transformed, torch_step
from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError
from modules.storage.datasets import Dataset
from modules.training.fields import FineTuneFields, finetune_epochs_field

RankRule = Literal["energy", "ratio"]
# A layer's own setting in `layers`: one of a fixed rank, an energy or a ratio, or "skip".
LOWRANK_LAYER_SETTINGS = {
    "rank": int_at_least(1),
    "energy": number_in(0, 1, lo_open=True),
    "ratio": number_in(0, 1, lo_open=True),
}


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values keep `energy` of sum(s**2)."""
    if not 0 < energy <= 1:
        raise BadInputError(f"energy must be in (0, 1], got {energy}")
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # A tiny tolerance so that energy=1.0 is reached despite float rounding.
    return int((kept < energy - 1e-12).sum()) + 1


def ratio_rank(full_rank: int, ratio: float) -> int:
    """ceil(ratio * full_rank), at least 1."""
    if not 0 < ratio <= 1:
        raise BadInputError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, math.ceil(ratio * full_rank))


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return u, s, vh


def _split(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]).float()
    second = (u[:, :rank] * root[None, :]).float()
    return first, second


def factorize_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Linear(in, out) -> Linear(in, rank, bias=False), Linear(rank, out) by truncated SVD."""
    u, s, vh = _svd(linear.weight)
    first_w, second_w = _split(u, s, vh, rank)
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second)


def factorize_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Conv2d(in, out, k) -> Conv2d(in, rank, k, bias=False), 1x1 Conv2d(rank, out)."""
    out_c, in_c, kh, kw = conv.weight.shape
    u, s, vh = _svd(conv.weight.reshape(out_c, in_c * kh * kw))
    first_w, second_w = _split(u, s, vh, rank)
    # A Conv2d's stride, padding and dilation are 2-tuples (or a padding mode string).
    stride = cast(tuple[int, int], conv.stride)
    padding = cast(str | tuple[int, int], conv.padding)
    dilation = cast(tuple[int, int], conv.dilation)
    first = nn.Conv2d(
        in_c,
        rank,
        (kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=False,
        padding_mode=conv.padding_mode,
    )
    second = nn.Conv2d(rank, out_c, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(rank, in_c, kh, kw))
        second.weight.copy_(second_w.reshape(out_c, rank, 1, 1))
        if conv.bias is not None and second.bias is not None:
            second.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, second)


def _plan(
    weight: torch.Tensor,
    *,
    rule: RankRule,
    energy: float,
    ratio: float,
    rank: int | None = None,
) -> tuple[int, int, float]:
    s = torch.linalg.svdvals(weight.detach().double().reshape(weight.shape[0], -1))
    if rank is None:
        rank = energy_rank(s, energy) if rule == "energy" else ratio_rank(len(s), ratio)
    kept = float((s[:rank] ** 2).sum() / (s**2).sum()) if float((s**2).sum()) else 1.0
    return rank, len(s), kept


def lowrank_factorize(
    model: nn.Module,
    *,
    rule: RankRule = "energy",
    energy: float = 0.9,
    ratio: float = 0.25,
    conv: bool = False,
    layers: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of `model` with each Linear (and Conv2d if `conv`) factorized where it pays.

    Returns the model and one report per candidate layer: rank, full rank, energy kept,
    parameters before and after, and whether it was replaced (and why not).
    layers: per-layer control (see layer_select): a layer's own {"rank": r}, {"energy": e}
    or {"ratio": q}, or "skip"; other layers use rule/energy/ratio.
    """
    factorized = copy.deepcopy(model).eval()
    report: list[dict[str, Any]] = []
    choices = lowrank_layer_choices(factorized, layers or {}, conv=conv)

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            where = f"{prefix}{name}"
            if type(child) is nn.Linear or (conv and type(child) is nn.Conv2d):
                choice = choices.get(where)
                if choice is not None and choice.setting is None:
                    report.append(
                        {
                            "layer": where,
                            "type": type(child).__name__,
                            "replaced": False,
                            "reason": f"skipped by layers pattern {choice.pattern!r}",
                        }
                    )
                    continue
                own = {} if choice is None else _own_rule(choice, child, where)
                entry = _factorize_one(
                    child,
                    where,
                    rule=own.get("rule", rule),
                    energy=own.get("energy", energy),
                    ratio=own.get("ratio", ratio),
                    rank=own.get("rank"),
                )
                if choice is not None:
                    entry["row"]["pattern"] = choice.pattern
                report.append(entry.pop("row"))
                if "module" in entry:
                    setattr(module, name, entry["module"])
            else:
                visit(child, f"{where}.")

    visit(factorized, "")
    return factorized, report


def lowrank_layer_choices(
    model: nn.Module, layers: Mapping[str, Any], *, conv: bool
) -> dict[str, LayerChoice]:
    """Resolve a `layers` param against the layers lowrank would factorize."""
    if not layers:
        return {}
    names = [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Linear or (conv and type(m) is nn.Conv2d)
    ]
    convs = not conv and any(type(m) is nn.Conv2d for m in model.modules())
    hint = " (Conv2d layers are candidates only with conv=true)" if convs else ""
    checked = check_layer_settings(layers, allowed=LOWRANK_LAYER_SETTINGS)
    return resolve_layers(checked, names, step="lowrank", hint=hint)


def _own_rule(choice: LayerChoice, layer: nn.Linear | nn.Conv2d, where: str) -> dict[str, Any]:
    """A layer's own rank rule from its `layers` setting; a rank above full rank is refused."""
    setting = choice.setting or {}
    if "rank" in setting:
        weight = layer.weight
        full = min(weight.shape[0], weight[0].numel())
        if setting["rank"] > full:
            raise BadInputError(
                f"lowrank: rank {setting['rank']} for layer {where!r} (pattern "
                f"{choice.pattern!r}) is larger than its full rank {full} "
                f"({type(layer).__name__} weight {list(weight.shape)}); use at most {full}"
            )
        return {"rank": int(setting["rank"])}
    if "energy" in setting:
        return {"rule": "energy", "energy": float(setting["energy"])}
    return {"rule": "ratio", "ratio": float(setting["ratio"])}


def _factorize_one(
    layer: nn.Linear | nn.Conv2d,
    where: str,
    *,
    rule: RankRule,
    energy: float,
    ratio: float,
    rank: int | None = None,
) -> dict[str, Any]:
    weight = layer.weight
    before = weight.numel()
    row: dict[str, Any] = {"layer": where, "type": type(layer).__name__}
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        row.update(replaced=False, reason=f"grouped convolution (groups={layer.groups})")
        return {"row": row}
    rank, full, kept = _plan(weight, rule=rule, energy=energy, ratio=ratio, rank=rank)
    out_dim, in_dim = weight.shape[0], weight[0].numel()
    after = rank * (in_dim + out_dim)
    row.update(rank=rank, full_rank=full, energy_kept=kept, weights_before=before)
    if after >= before:
        row.update(replaced=False, weights_after=before, reason=f"rank {rank} saves nothing")
        return {"row": row}
    row.update(replaced=True, weights_after=after)
    if isinstance(layer, nn.Linear):
        return {"row": row, "module": factorize_linear(layer, rank)}
    return {"row": row, "module": factorize_conv(layer, rank)}


class LowRankParams(FineTuneFields, LayerControlFields):
    """Params of the `lowrank` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    LAYER_SETTINGS = LOWRANK_LAYER_SETTINGS

    rank_rule: RankRule = Field(
        default="energy",
        description="energy: smallest rank keeping `energy` of sum(s^2); ratio: ceil(ratio * "
        "full rank).",
    )
    energy: float = Field(
        default=0.9, gt=0, le=1, description="Share of squared singular values to keep."
    )
    ratio: float = Field(default=0.25, gt=0, le=1, description="Rank as a share of full rank.")
    conv: bool = Field(
        default=False, description="Also decompose Conv2d layers (k x k conv then 1 x 1 conv)."
    )
    # SVD keeps more of the function than pruning does: fewer epochs win it back.
    finetune_epochs: int = finetune_epochs_field(3)
    layers: dict[str, Any] = layers_field(
        '{"rank": r}, {"energy": e} or {"ratio": q}',
        fallback="the global rule",
        no_match="a pattern matching no candidate layer, or a rank above the layer's full rank,",
    )


@register_step("lowrank", params=LowRankParams, accepts={"torch"})
def lowrank_step(
    model: ModelArtifact, data: Dataset, params: LowRankParams, ctx: StepContext
) -> StepOutput:
    """Factorize Linear (and optionally Conv2d) layers by truncated SVD, then fine-tune."""
    return torch_step(model, data, params, ctx, name="lowrank", transform=_factorize)


def _factorize(
    model: nn.Module, _data: Dataset, params: LowRankParams, _ctx: StepContext
) -> Transformed:
    factorized, layers = lowrank_factorize(
        model,
        rule=params.rank_rule,
        energy=params.energy,
        ratio=params.ratio,
        conv=params.conv,
        layers=params.layers,
    )
    metrics: dict[str, Any] = {
        "rank_rule": params.rank_rule,
        "layers": layers,
        "layers_replaced": sum(1 for row in layers if row["replaced"]),
    }
    if params.layers:
        metrics["layer_settings"] = describe_choices(
            lowrank_layer_choices(model, params.layers, conv=params.conv)
        )
    return Transformed(factorized, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: factorize one model file through run_step; print one JSON line."""
    from modules.pipeline.script import ScriptOptions, script_main

    # --ratio alone picks the ratio rule, as --energy alone is the default rule.
    options = ScriptOptions(implies={"ratio": {"rank_rule": "ratio"}})
    return script_main("lowrank", argv, options)


if __name__ == "__main__":
    raise SystemExit(main())
