"""The built-in torch architectures (mlp, cnn, resnet, sequential) and the arch registry.

Every architecture takes flat float32 input of shape (batch, in_features); image models
unflatten internally. The registry also holds torchvision-layout ResNet-18/34/50,
MobileNetV2 and VGG-11/16 by name (modules.storage.torchvision_archs), whose state_dict keys
are torchvision's. A model is described either by a named arch
(`{"name": "mlp", "in_features": 64, "hidden": [128], "num_classes": 10}`) or by a module
tree (`{"name": "tree", "tree": {...}}`, see modules.storage.arch_tree). Each builder writes
its model as a module tree, so everything it builds round-trips exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from modules.errors import BadInputError, IncompatibleError, NotFoundError
from modules.storage.arch_tree import (
    MAX_CHILDREN,
    MAX_IMAGE_SIZE,
    MAX_LIST_LEN,
    MAX_WIDTH,
    check_width,
    int_in,
    int_list,
    module_from_tree,
    show,
)
from modules.storage.torchvision_archs import TORCHVISION_ARCHS


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


_image_size = int_in(1, MAX_IMAGE_SIZE)
_widths = int_list(1, MAX_WIDTH, min_len=1, max_len=MAX_LIST_LEN)


def mlp(*, in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    """Linear, ReLU, ..., Linear."""
    sizes = [
        check_width(in_features, "mlp.in_features"),
        *int_list(1, MAX_WIDTH, min_len=0, max_len=MAX_LIST_LEN)(hidden, "mlp.hidden"),
        check_width(num_classes, "mlp.num_classes"),
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
    c_in = check_width(in_channels, "cnn.in_channels")
    size = _image_size(image_size, "cnn.image_size")
    stages = _widths(channels, "cnn.channels")
    classes = check_width(num_classes, "cnn.num_classes")
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
    c_in = check_width(in_channels, "resnet.in_channels")
    size = _image_size(image_size, "resnet.image_size")
    stage_widths = _widths(widths, "resnet.widths")
    stage_blocks = int_list(1, MAX_LIST_LEN, min_len=1, max_len=MAX_LIST_LEN)(
        blocks, "resnet.blocks"
    )
    classes = check_width(num_classes, "resnet.num_classes")
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
            f"got {show(layers)}"
        )
    return cast(nn.Sequential, module_from_tree(_sequential(layers)))


_ARCH_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet": resnet,
    "sequential": sequential,
    "tree": module_from_tree,
    **TORCHVISION_ARCHS,
}
ARCH_NAMES: tuple[str, ...] = tuple(_ARCH_BUILDERS)
_IMAGE_ARCHS = ("cnn", "resnet", *TORCHVISION_ARCHS)


def _arch_name(arch: Any) -> str:
    if not isinstance(arch, Mapping):
        raise BadInputError(f"arch: expected a dict with a 'name', got {show(arch)}")
    name = arch.get("name")
    if name not in _ARCH_BUILDERS:
        raise NotFoundError(f"unknown arch {show(name)}; known archs: {', '.join(ARCH_NAMES)}")
    return str(name)


def arch_kwargs(name: str) -> tuple[str, ...]:
    """The kwargs an arch takes beside its name."""
    if name not in _ARCH_BUILDERS:
        raise NotFoundError(f"unknown arch {show(name)}; known archs: {', '.join(ARCH_NAMES)}")
    return tuple(inspect.signature(_ARCH_BUILDERS[name]).parameters)


def _required_kwargs(name: str) -> tuple[str, ...]:
    parameters = inspect.signature(_ARCH_BUILDERS[name]).parameters.values()
    return tuple(p.name for p in parameters if p.default is inspect.Parameter.empty)


def build_model(arch: Mapping[str, Any]) -> nn.Module:
    """Build a fresh model from a named arch or a module tree arch."""
    name = _arch_name(arch)
    expected = arch_kwargs(name)
    given = {k: v for k, v in arch.items() if k != "name"}
    unknown = sorted(str(k) for k in set(given) - set(expected))
    if unknown:
        raise BadInputError(
            f"arch '{name}' got unknown kwarg(s) {unknown}; it takes {', '.join(expected)}"
        )
    missing = [k for k in _required_kwargs(name) if k not in given]
    if missing:
        raise BadInputError(f"arch '{name}' is missing kwarg(s) {', '.join(missing)}")
    return _ARCH_BUILDERS[name](**given)


def expected_state_shapes(arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of `arch` and its shape, from a model built on the meta device.

    Nothing is allocated: meta tensors have shapes but no storage, so even an arch that
    declares hundreds of millions of parameters costs only its module objects.
    """
    with torch.device("meta"):
        model = build_model(arch)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_state_dict(arch: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Refuse a state_dict whose keys or shapes do not match `arch`, naming the first mismatch.

    Checked against shapes alone (see expected_state_shapes), before any model is allocated.
    """
    name = _arch_name(arch)
    expected = expected_state_shapes(arch)
    for key, shape in expected.items():
        if key not in state:
            raise IncompatibleError(
                f"state_dict does not fit arch '{name}': key {key!r} (shape {list(shape)}) is "
                f"missing ({len(state)} keys given, {len(expected)} expected)"
            )
        given = tuple(getattr(state[key], "shape", ()))
        if given != shape:
            raise IncompatibleError(
                f"state_dict does not fit arch '{name}': key {key!r} has shape {list(given)}, "
                f"the arch expects {list(shape)}"
            )
    extra = [key for key in state if key not in expected]
    if extra:
        raise IncompatibleError(
            f"state_dict does not fit arch '{name}': key {extra[0]!r} is not in the arch "
            f"({len(extra)} unexpected key(s))"
        )


def build_model_with_state(arch: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model of `arch` holding `state`, checked first, allocating nothing beyond `state`.

    The model is built on the meta device and the state's tensors are assigned into it;
    a float state_dict of one dtype keeps that dtype, mixed float dtypes become float32.
    """
    check_state_dict(arch, state)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) > 1:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = build_model(arch)
    model.load_state_dict(state, strict=True, assign=True)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:  # a tensor the state_dict does not carry (none of the built-in archs has one)
        raise IncompatibleError(
            f"arch '{arch.get('name')}' has tensors no state_dict holds: {left}"
        )
    return model


def named_arch_matches(module: nn.Module, arch: Any) -> bool:
    """Whether `module` is still exactly the torchvision-layout `arch`: module types, shapes.

    Only those archs are saved by name: their block classes have no module tree, while the
    zoo's own archs are saved as their (exact) tree.
    """
    if not isinstance(arch, Mapping) or arch.get("name") not in TORCHVISION_ARCHS:
        return False
    try:
        with torch.device("meta"):
            reference = build_model(arch)
    except BadInputError:
        return False
    if [type(m) for m in reference.modules()] != [type(m) for m in module.modules()]:
        return False
    actual = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    return actual == expected


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
                f"arch '{name}' sets {key}={show(done[key])} but the dataset has {key}={value}"
            )
    return done
