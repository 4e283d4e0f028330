"""ResNet-18/34/50, MobileNetV2 and VGG-11/16 in plain torch, with torchvision's module names.

Every parameter and buffer has exactly the name and shape it has in torchvision 0.2x
(`conv1.weight`, `layer1.0.bn1.running_mean`, `features.1.conv.0.0.weight`,
`classifier.6.bias`, ...), so a torchvision `state_dict()` loads with `strict=True`.
torchvision itself is not needed (and does not work with this torch).

Beside torchvision's `num_classes`, each takes `in_channels` (3) and `image_size` (224): the
forward accepts `(batch, in_channels, image_size, image_size)` images, or the flat
`(batch, in_channels * image_size**2)` rows the built-in datasets use, unflattened first.
The unflatten layer holds no tensors, so it adds no state_dict key.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modules.errors import BadInputError
from modules.storage.arch_tree import MAX_IMAGE_SIZE, check_width, int_in

_image_size = int_in(8, MAX_IMAGE_SIZE)
_in_channels = int_in(1, 64)


class _ImageInput(nn.Module):
    """Flat rows -> images; images pass through."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.unflatten = nn.Unflatten(1, (in_channels, image_size, image_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unflatten(x) if x.dim() == 2 else x


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet with the default (non-grouped, non-wide) blocks."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
    ) -> None:
        super().__init__()
        self.input = _ImageInput(in_channels, image_size)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, *, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.input(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation as MobileNetV2 uses it: conv, BN, ReLU6."""

    def __init__(self, in_planes: int, out_planes: int, *, kernel: int, stride: int, groups: int):
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual."""

    def __init__(self, inp: int, oup: int, *, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel=1, stride=1, groups=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# t (expansion), c (channels), n (repeats), s (first stride): torchvision's default setting.
_MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenetv2.MobileNetV2 at width 1.0."""

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.input = _ImageInput(in_channels, image_size)
        channels, last = 32, 1280
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, channels, kernel=3, stride=2, groups=1)
        ]
        for t, c, n, s in _MOBILENET_V2_SETTING:
            for i in range(n):
                features.append(
                    InvertedResidual(channels, c, stride=s if i == 0 else 1, expand_ratio=t)
                )
                channels = c
        features.append(Conv2dNormActivation(channels, last, kernel=1, stride=1, groups=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(self.input(x)), (1, 1))
        return self.classifier(torch.flatten(x, 1))


_VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """torchvision.models.vgg.VGG without batch norm."""

    def __init__(
        self, cfg: tuple[int | str, ...], *, num_classes: int, in_channels: int, image_size: int
    ) -> None:
        super().__init__()
        self.input = _ImageInput(in_channels, image_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for value in cfg:
            if isinstance(value, str):  # "M"
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, value, kernel_size=3, padding=1), nn.ReLU(True)]
                channels = value
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(self.input(x)))
        return self.classifier(torch.flatten(x, 1))


def _checked(name: str, num_classes: int, in_channels: int, image_size: int) -> dict[str, int]:
    size = _image_size(image_size, f"{name}.image_size")
    # Five stride-2 stages: below 32 pixels the feature map vanishes.
    if size < 32:
        raise BadInputError(f"{name}.image_size: must be at least 32, got {size}")
    return {
        "num_classes": check_width(num_classes, f"{name}.num_classes"),
        "in_channels": _in_channels(in_channels, f"{name}.in_channels"),
        "image_size": size,
    }


def resnet18(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> ResNet:
    """torchvision-layout ResNet-18."""
    kw = _checked("resnet18", num_classes, in_channels, image_size)
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


def resnet34(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> ResNet:
    """torchvision-layout ResNet-34."""
    kw = _checked("resnet34", num_classes, in_channels, image_size)
    return ResNet(BasicBlock, [3, 4, 6, 3], **kw)


def resnet50(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> ResNet:
    """torchvision-layout ResNet-50."""
    kw = _checked("resnet50", num_classes, in_channels, image_size)
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


def mobilenet_v2(
    *, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224
) -> MobileNetV2:
    """torchvision-layout MobileNetV2 (width 1.0)."""
    return MobileNetV2(**_checked("mobilenet_v2", num_classes, in_channels, image_size))


def vgg11(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> VGG:
    """torchvision-layout VGG-11 (no batch norm)."""
    return VGG(_VGG_CFGS["A"], **_checked("vgg11", num_classes, in_channels, image_size))


def vgg16(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> VGG:
    """torchvision-layout VGG-16 (no batch norm)."""
    return VGG(_VGG_CFGS["D"], **_checked("vgg16", num_classes, in_channels, image_size))


TORCHVISION_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "vgg11": vgg11,
    "vgg16": vgg16,
}
