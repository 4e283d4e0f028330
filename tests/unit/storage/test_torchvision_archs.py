"""torchvision-layout archs: exact key names and sizes, state dicts checked before allocation."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError, ModelFormatError
from modules.storage.architectures import (
    ARCH_NAMES,
    build_model,
    check_state_dict,
    complete_arch,
    expected_state_shapes,
)
from modules.storage.model_formats import load_model, save_model
from modules.storage.torchvision_archs import TORCHVISION_ARCHS

ROOT = Path(__file__).resolve().parents[3]

# Parameter counts torchvision publishes for these models (ImageNet heads, 1000 classes).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "vgg11": 132_863_336,
    "vgg16": 138_357_544,
}

# An excerpt of `torchvision.models.resnet18().state_dict()`, in its order, with shapes.
RESNET18_KEYS = [
    ("conv1.weight", (64, 3, 7, 7)),
    ("bn1.weight", (64,)),
    ("bn1.bias", (64,)),
    ("bn1.running_mean", (64,)),
    ("bn1.running_var", (64,)),
    ("bn1.num_batches_tracked", ()),
    ("layer1.0.conv1.weight", (64, 64, 3, 3)),
    ("layer1.0.bn1.weight", (64,)),
    ("layer1.0.conv2.weight", (64, 64, 3, 3)),
    ("layer2.0.conv1.weight", (128, 64, 3, 3)),
    ("layer2.0.downsample.0.weight", (128, 64, 1, 1)),
    ("layer2.0.downsample.1.running_var", (128,)),
    ("layer3.1.bn2.bias", (256,)),
    ("layer4.0.downsample.0.weight", (512, 256, 1, 1)),
    ("layer4.1.conv2.weight", (512, 512, 3, 3)),
    ("fc.weight", (1000, 512)),
    ("fc.bias", (1000,)),
]
OTHER_KEYS = {
    "resnet50": [
        ("layer1.0.conv3.weight", (256, 64, 1, 1)),
        ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
        ("layer4.2.bn3.running_mean", (2048,)),
        ("fc.weight", (1000, 2048)),
    ],
    "mobilenet_v2": [
        ("features.0.0.weight", (32, 3, 3, 3)),
        ("features.0.1.running_mean", (32,)),
        ("features.1.conv.0.0.weight", (32, 1, 3, 3)),
        ("features.1.conv.1.weight", (16, 32, 1, 1)),
        ("features.1.conv.2.weight", (16,)),
        ("features.2.conv.0.0.weight", (96, 16, 1, 1)),
        ("features.2.conv.1.0.weight", (96, 1, 3, 3)),
        ("features.2.conv.3.running_var", (24,)),
        ("features.18.0.weight", (1280, 320, 1, 1)),
        ("classifier.1.weight", (1000, 1280)),
    ],
    "vgg11": [
        ("features.0.weight", (64, 3, 3, 3)),
        ("features.18.weight", (512, 512, 3, 3)),
        ("classifier.0.weight", (4096, 25088)),
        ("classifier.6.bias", (1000,)),
    ],
    "vgg16": [
        ("features.0.weight", (64, 3, 3, 3)),
        ("features.28.bias", (512,)),
        ("classifier.3.weight", (4096, 4096)),
        ("classifier.6.weight", (1000, 4096)),
    ],
}
SMALL = {"num_classes": 10, "in_channels": 1, "image_size": 32}


def _meta_params(name: str) -> int:
    with torch.device("meta"):
        model = build_model({"name": name})
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_ARCHS))
def test_parameter_counts_match_torchvision(name: str) -> None:
    assert name in ARCH_NAMES
    assert _meta_params(name) == TORCHVISION_PARAMS[name]


def test_resnet18_state_dict_keys_are_torchvision_s() -> None:
    shapes = expected_state_shapes({"name": "resnet18"})
    assert len(shapes) == 122  # torchvision resnet18: 62 parameters + 60 BN buffers
    for key, shape in RESNET18_KEYS:
        assert shapes[key] == shape, key
    keys = list(shapes)
    assert [k for k in keys if k in dict(RESNET18_KEYS)] == [k for k, _ in RESNET18_KEYS]
    assert keys[0] == "conv1.weight" and keys[-1] == "fc.bias"


@pytest.mark.parametrize("name", sorted(OTHER_KEYS))
def test_other_archs_use_torchvision_key_names(name: str) -> None:
    shapes = expected_state_shapes({"name": name})
    for key, shape in OTHER_KEYS[name]:
        assert shapes[key] == shape, (name, key)


def _state_of(arch: dict[str, object]) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's key set (generated from our own module, torchvision is
    not installed), random values so a load that ignored them would show."""
    torch.manual_seed(3)
    model = build_model(arch)
    generator = torch.Generator().manual_seed(4)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            state[key] = torch.rand(value.shape, generator=generator) * 0.1 + 0.95
        else:
            state[key] = value.clone()
    return state


def _torch_save(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_a_torchvision_state_dict_loads_into_the_built_in_arch(name: str) -> None:
    arch = {"name": name, **SMALL}
    state = _state_of(arch)
    reference = build_model(arch)
    reference.load_state_dict(state)
    reference.eval()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = reference(x)
    for data, given in (
        (_torch_save({"arch": arch, "state_dict": state}), None),  # checkpoint with its arch
        (_torch_save(state), json.dumps(arch)),  # bare state dict + --arch JSON
    ):
        artifact = load_model(data, filename="model.pt", arch=given)
        assert artifact.meta["arch"] == arch
        assert (artifact.meta["in_features"], artifact.meta["num_classes"]) == (1024, 10)
        torch.testing.assert_close(artifact.obj(x), expected)
        # the flat rows of a built-in dataset give the same answer
        torch.testing.assert_close(artifact.obj(x.reshape(3, -1)), expected)
        # saved by name (its blocks have no module tree) and loaded back unchanged
        again = load_model(save_model(artifact))
        assert again.meta["arch"] == arch
        torch.testing.assert_close(again.obj(x), expected)


def test_a_named_arch_string_in_a_checkpoint_and_a_bare_name() -> None:
    state = _state_of({"name": "resnet18"})
    loaded = load_model(_torch_save({"arch": "resnet18", "state_dict": state}))
    assert loaded.meta["arch"] == {"name": "resnet18"} and loaded.meta["num_classes"] == 1000
    bare = load_model(_torch_save(state), arch="resnet18")
    assert bare.meta["arch"] == {"name": "resnet18"}
    assert torch.equal(bare.obj.fc.weight, state["fc.weight"])


def test_state_dict_mismatches_name_the_first_key() -> None:
    arch = {"name": "resnet18", **SMALL}
    shapes = expected_state_shapes(arch)
    state = {key: torch.zeros(shape) for key, shape in shapes.items()}
    missing = {k: v for k, v in state.items() if k != "layer2.0.downsample.0.weight"}
    with pytest.raises(ModelFormatError, match=r"'layer2.0.downsample.0.weight'.*missing"):
        load_model(_torch_save(missing), arch=json.dumps(arch))
    wrong = {**state, "fc.weight": torch.zeros(1000, 512)}
    with pytest.raises(ModelFormatError, match=r"'fc.weight' has shape \[1000, 512\]"):
        load_model(_torch_save(wrong), arch=json.dumps(arch))
    extra = {**state, "head.weight": torch.zeros(3)}
    with pytest.raises(ModelFormatError, match="'head.weight' is not in the arch"):
        load_model(_torch_save(extra), arch=json.dumps(arch))


def test_unknown_and_bad_archs_are_clear_errors() -> None:
    state = _torch_save({"w": torch.zeros(2)})
    with pytest.raises(ModelFormatError, match="unknown arch 'resnet19'; known archs: .*resnet18"):
        load_model(state, arch="resnet19")
    with pytest.raises(BadInputError, match="neither an arch name"):
        load_model(state, arch="resnet18; rm -rf /")
    with pytest.raises(BadInputError, match="not valid JSON"):
        load_model(state, arch="{broken")
    with pytest.raises(ModelFormatError, match="image_size: must be at least 32"):
        load_model(state, arch='{"name": "vgg11", "image_size": 16}')
    with pytest.raises(ModelFormatError, match="bare state_dict .*--arch"):
        load_model(state)


def test_the_checkpoint_arch_and_a_given_arch_must_agree() -> None:
    state = _state_of({"name": "resnet18", **SMALL})
    data = _torch_save({"arch": {"name": "resnet18", **SMALL}, "state_dict": state})
    with pytest.raises(BadInputError, match="names arch 'resnet18' but the arch given"):
        load_model(data, arch="resnet34")


def test_complete_arch_fills_image_kwargs_for_torchvision_archs() -> None:
    done = complete_arch(
        {"name": "resnet18"}, in_features=3 * 32 * 32, num_classes=10, image_shape=(3, 32, 32)
    )
    assert done == {"name": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 32}


def test_check_state_dict_needs_no_allocation_for_the_arch() -> None:
    # VGG-16 is 138 M parameters (550 MB); its check builds it on the meta device only.
    with pytest.raises(Exception, match="'features.0.weight'.*missing"):
        check_state_dict({"name": "vgg16"}, {})


_RSS_PROBE = """
import io, json, resource, sys, torch
from modules.errors import McaasError
from modules.storage.model_formats import load_model
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(data, filename="model.pt")
    outcome = "loaded"
except McaasError as exc:
    outcome = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_kib": after - before}))
"""


def test_a_small_checkpoint_declaring_a_huge_arch_allocates_nothing(tmp_path: Path) -> None:
    """Issue 20: a 1.4 KB file whose arch declares ~197 M parameters and an empty state_dict."""
    tree = {
        "type": "Sequential",
        "children": {
            "0": {"type": "Linear", "in_features": 14_000, "out_features": 14_000},
            "1": {"type": "Linear", "in_features": 14_000, "out_features": 64},
        },
    }
    path = tmp_path / "huge.pt"
    path.write_bytes(_torch_save({"arch": {"name": "tree", "tree": tree}, "state_dict": {}}))
    assert path.stat().st_size < 4096
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "'0.weight'" in result["outcome"] and "missing" in result["outcome"]
    # Building it for real would take ~790 MB; the check may cost a few MB of objects.
    assert result["grew_kib"] < 64 * 1024, result


def test_a_changed_torchvision_model_is_not_saved_under_its_name() -> None:
    arch = {"name": "resnet18", **SMALL}
    artifact = load_model(_torch_save(_state_of(arch)), arch=json.dumps(arch))
    artifact.obj.fc = torch.nn.Linear(512, 4)
    with pytest.raises(BadInputError, match="not in the module allow-list"):
        save_model(ModelArtifact("torch", artifact.obj, artifact.meta))
