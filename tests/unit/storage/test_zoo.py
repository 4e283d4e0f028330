"""The torch architectures: each builds and runs, trees round-trip, hostile archs are refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from modules.errors import BadInputError, IncompatibleError, NotFoundError
from modules.storage.arch_tree import (
    MAX_PARAMS,
    arch_of,
    module_from_tree,
    module_to_tree,
    tree_param_count,
)
from modules.storage.architectures import build_model, complete_arch
from modules.storage.layers import ResidualBlock

MLP = {"name": "mlp", "in_features": 64, "hidden": [32, 16], "num_classes": 10}
CNN = {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [8, 16, 16], "num_classes": 10}
RESNET = {
    "name": "resnet",
    "in_channels": 1,
    "image_size": 8,
    "widths": [8, 16],
    "blocks": [2, 1],
    "num_classes": 10,
}
SEQUENTIAL = {
    "name": "sequential",
    "layers": [
        {"type": "Linear", "in_features": 64, "out_features": 32},
        {"type": "LayerNorm", "normalized_shape": [32]},
        {"type": "GELU"},
        {"type": "Dropout", "p": 0.1},
        {"type": "Linear", "in_features": 32, "out_features": 10},
    ],
}


def _randomise(model: nn.Module) -> nn.Module:
    """Give every parameter and norm buffer non-default values so equality means something."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return model.eval()


def _rebuilt(model: nn.Module) -> nn.Module:
    tree = json.loads(json.dumps(module_to_tree(model)))  # the tree is plain JSON
    clone = module_from_tree(tree)
    clone.load_state_dict(model.state_dict(), strict=True)
    return clone.eval()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", [MLP, CNN, RESNET, SEQUENTIAL], ids=lambda a: a["name"])
def test_each_arch_builds_and_runs_on_flat_digits_input(arch: dict[str, Any], batch: torch.Tensor):
    model = build_model(arch).eval()
    out = model(batch)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", [MLP, CNN, RESNET, SEQUENTIAL], ids=lambda a: a["name"])
def test_tree_round_trip_gives_identical_outputs(arch: dict[str, Any], batch: torch.Tensor):
    model = _randomise(build_model(arch))
    clone = _rebuilt(model)
    assert str(clone) == str(model)
    assert torch.equal(clone(batch), model(batch))


def test_tree_round_trip_of_a_shrunk_linear(batch: torch.Tensor):
    model = build_model(MLP)
    model[0] = nn.Linear(64, 20)  # a structurally pruned first layer ...
    model[2] = nn.Linear(20, 16)  # ... and the next layer's inputs to match
    model = _randomise(model)
    tree = module_to_tree(model)
    assert tree["children"]["0"]["out_features"] == 20
    assert tree["children"]["2"]["in_features"] == 20
    assert torch.equal(_rebuilt(model)(batch), model(batch))


def test_tree_round_trip_of_a_low_rank_factorised_linear(batch: torch.Tensor):
    model = build_model(MLP)
    model[0] = nn.Sequential(nn.Linear(64, 4, bias=False), nn.Linear(4, 32))
    model = _randomise(model)
    first = module_to_tree(model)["children"]["0"]
    assert first["type"] == "Sequential"
    assert [c["out_features"] for c in first["children"].values()] == [4, 32]
    assert first["children"]["0"]["bias"] is False
    assert torch.equal(_rebuilt(model)(batch), model(batch))


def test_tree_round_trip_of_a_pruned_residual_block(batch: torch.Tensor):
    model = build_model(RESNET)
    block = model[4]
    assert isinstance(block, ResidualBlock)
    block.conv1 = nn.Conv2d(8, 5, 3, padding=1, bias=False)  # pruned inner channels
    block.bn1 = nn.BatchNorm2d(5)
    block.conv2 = nn.Conv2d(5, 8, 3, padding=1, bias=False)
    model = _randomise(model)
    assert torch.equal(_rebuilt(model)(batch), model(batch))


def test_arch_of_rebuilds_through_build_model(batch: torch.Tensor):
    model = _randomise(build_model(CNN))
    arch = arch_of(model)
    assert arch["name"] == "tree"
    clone = build_model(arch)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.eval()(batch), model(batch))


def test_mlp_structure():
    model = build_model(MLP)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 16, 10]


def test_cnn_pools_only_while_the_side_is_at_least_four():
    model = build_model(CNN)
    assert isinstance(model[0], nn.Unflatten)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 2  # 8 -> 4 -> 2, then no more
    assert sum(isinstance(m, nn.Conv2d) for m in model) == 3
    assert isinstance(model[-1], nn.Linear) and model[-1].in_features == 16


def test_resnet_blocks_have_conv_shortcuts_only_where_shape_changes():
    model = build_model(RESNET)
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3
    assert isinstance(blocks[0].shortcut, nn.Identity)
    assert isinstance(blocks[1].shortcut, nn.Identity)
    assert isinstance(blocks[2].shortcut, nn.Sequential)
    assert blocks[2].conv1.stride == (2, 2)
    for block in blocks:
        assert [name for name, _ in block.named_children()] == [
            "conv1",
            "bn1",
            "conv2",
            "bn2",
            "shortcut",
        ]
        assert not block._parameters and not block._buffers


def test_unknown_arch_name_lists_the_known_ones():
    with pytest.raises(NotFoundError, match="mlp, cnn, resnet, sequential, tree"):
        build_model({"name": "transformer"})


@pytest.mark.parametrize(
    ("arch", "named"),
    [
        ({"name": "mlp", "in_features": 64, "hidden": [32]}, "num_classes"),
        ({**MLP, "depth": 3}, "depth"),
        ({**MLP, "hidden": [32, -1]}, "mlp.hidden"),
        ({**MLP, "hidden": [8] * 65}, "mlp.hidden"),
        ({**MLP, "in_features": True}, "mlp.in_features"),
        ({**MLP, "in_features": 64.0}, "mlp.in_features"),
        ({**MLP, "num_classes": 70_000}, "mlp.num_classes"),
        ({**CNN, "channels": []}, "cnn.channels"),
        ({**CNN, "image_size": 0}, "cnn.image_size"),
        ({**RESNET, "blocks": [1]}, "resnet.blocks"),
        ({"name": "sequential", "layers": [{"type": "Linear", "in_features": 4}]}, "out_features"),
        (
            {"name": "sequential", "layers": [{"type": "Linear", "in_features": 4, "out": 2}]},
            "out",
        ),
    ],
)
def test_bad_kwargs_are_refused_naming_the_kwarg(arch: dict[str, Any], named: str):
    with pytest.raises(BadInputError, match=named):
        build_model(arch)


def test_tree_with_a_type_outside_the_allow_list_is_refused():
    tree = {"type": "Sequential", "children": {"0": {"type": "Bilinear"}}}
    with pytest.raises(BadInputError, match=r"tree\.0.*'Bilinear' is not allowed"):
        module_from_tree(tree)


def test_residual_block_tree_needs_its_exact_children():
    tree = {"type": "ResidualBlock", "children": {"conv1": {"type": "Identity"}}}
    with pytest.raises(BadInputError, match="conv1', 'bn1', 'conv2', 'bn2', 'shortcut"):
        module_from_tree(tree)


def test_module_to_tree_names_the_path_and_type_of_a_foreign_module():
    class Custom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Custom()))
    with pytest.raises(BadInputError, match=r"model\.1\.1 is a .*Custom"):
        module_to_tree(model)


def test_module_to_tree_refuses_hooked_modules():
    model = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(BadInputError, match="hooks"):
        module_to_tree(model)


def test_module_to_tree_refuses_tensors_that_do_not_match_the_constructor_args():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(3, 4))  # edited weight, stale out_features
    with pytest.raises(BadInputError, match="imply"):
        module_to_tree(nn.Sequential(layer))


def test_a_billion_parameter_arch_is_refused_before_anything_is_allocated(
    monkeypatch: pytest.MonkeyPatch,
):
    def no_allocation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a layer was constructed")

    monkeypatch.setattr(nn.Linear, "__init__", no_allocation)
    monkeypatch.setattr(nn.Conv2d, "__init__", no_allocation)
    huge = {"name": "mlp", "in_features": 32_000, "hidden": [32_000], "num_classes": 10}
    requested = 32_000 * 32_000
    assert requested > MAX_PARAMS
    with pytest.raises(BadInputError, match="parameters"):
        build_model(huge)
    wide_cnn = {**CNN, "in_channels": 3, "channels": [65_536, 65_536]}
    with pytest.raises(BadInputError, match="parameters"):
        build_model(wide_cnn)
    layers = [{"type": "Linear", "in_features": 40_000, "out_features": 40_000}] * 2
    with pytest.raises(BadInputError, match="parameters"):
        build_model({"name": "sequential", "layers": layers})


def test_tree_param_count_matches_the_built_model():
    model = build_model(MLP)
    assert tree_param_count(module_to_tree(model)) == sum(p.numel() for p in model.parameters())


def test_deeply_nested_tree_is_refused():
    tree: dict[str, Any] = {"type": "Identity"}
    for _ in range(40):
        tree = {"type": "Sequential", "children": {"0": tree}}
    with pytest.raises(BadInputError, match="deeper"):
        module_from_tree(tree)


def test_complete_arch_fills_dataset_dims():
    mlp = complete_arch(
        {"name": "mlp", "hidden": [16]}, in_features=64, num_classes=10, image_shape=(1, 8, 8)
    )
    assert mlp == {"name": "mlp", "hidden": [16], "in_features": 64, "num_classes": 10}
    cnn = complete_arch(
        {"name": "cnn", "channels": [8]}, in_features=64, num_classes=10, image_shape=(1, 8, 8)
    )
    assert (cnn["in_channels"], cnn["image_size"], cnn["num_classes"]) == (1, 8, 10)
    assert build_model(cnn)(torch.zeros(2, 64)).shape == (2, 10)


def test_complete_arch_refuses_image_archs_on_flat_data():
    with pytest.raises(BadInputError, match="needs image data"):
        complete_arch(
            {"name": "resnet", "widths": [8], "blocks": [1]},
            in_features=30,
            num_classes=2,
            image_shape=None,
        )


def test_complete_arch_refuses_conflicting_dims():
    with pytest.raises(IncompatibleError, match="in_features=30"):
        complete_arch(
            {"name": "mlp", "hidden": [], "in_features": 30},
            in_features=64,
            num_classes=10,
            image_shape=None,
        )
