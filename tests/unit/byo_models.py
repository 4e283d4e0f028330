"""Models the project did not write, as a user's own torch model reaches the steps.

The agreed in-memory form: ModelArtifact("torch", <any nn.Module>, meta with
"format": "pt2" and "inputs": [{"name", "shape" (per sample, None = dynamic), "dtype"}]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from modules.core.artifact import ModelArtifact
from modules.training.finetune import eval_mode


class ResidualMLP(nn.Module):
    """Linear -> LayerNorm -> residual block -> head: a residual add the pruner must respect."""

    def __init__(self, in_features: int = 64, width: int = 48, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.norm = nn.LayerNorm(width)
        self.block = nn.Sequential(
            nn.Linear(width, width * 2), nn.ReLU(), nn.Linear(width * 2, width)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.stem(x)))
        h = h + self.block(h)
        return self.head(h)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    """A ResNet-shaped CNN for (3, 32, 32) images: stem, two residual stages, pooled head."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, width * 2, 2)
        self.fc = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ToyTransformer(nn.Module):
    """Token ids + attention mask -> class logits: one encoder layer, masked mean pooling."""

    def __init__(self, vocab: int = 50, dim: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, dim * 2, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).float()
        return self.head((h * weights).sum(1) / weights.sum(1).clamp(min=1.0))


IMAGE_INPUTS = [{"name": "x", "shape": [3, 32, 32], "dtype": "float32"}]
TOKEN_INPUTS = [
    {"name": "input_ids", "shape": [None], "dtype": "int64"},
    {"name": "attention_mask", "shape": [None], "dtype": "int64"},
]


def byo_artifact(module: nn.Module, inputs: list[dict[str, Any]]) -> ModelArtifact:
    """A user's own model in the agreed form (as the .pt2 loader hands it over)."""
    return ModelArtifact("torch", eval_mode(module), {"format": "pt2", "inputs": inputs})


def exported(module: nn.Module, inputs: list[dict[str, Any]]) -> nn.Module:
    """The module a .pt2 upload becomes: ExportedProgram.module(), batch (and None dims) dynamic."""
    args = tuple(torch.from_numpy(v) for v in example_inputs(inputs, n=3).values())
    auto = torch.export.Dim.AUTO
    dynamic = tuple(
        {0: auto} | {i + 1: auto for i, d in enumerate(spec["shape"]) if d is None}
        for spec in inputs
    )
    return torch.export.export(module.eval(), args, dynamic_shapes=dynamic).module()


def example_inputs(
    inputs: list[dict[str, Any]], *, n: int = 2, dynamic: int = 12, seed: int = 0
) -> dict[str, np.ndarray]:
    """n rows for each declared input; dynamic dims get `dynamic`, int inputs small ids."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = (n, *[dynamic if d is None else d for d in spec["shape"]])
        if spec["dtype"].startswith("int"):
            out[spec["name"]] = rng.integers(1, 40, size=shape).astype(spec["dtype"])
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    if "attention_mask" in out:
        out["attention_mask"] = np.ones_like(out["attention_mask"])
        out["attention_mask"][:, -3:] = 0
    return out


def token_dataset_npz(path: Any, *, n_train: int = 96, n_test: int = 48, seq: int = 12) -> None:
    """A learnable token task in the several-input convention: the class is the first id mod 4."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ids = rng.integers(1, 40, size=(n, seq)).astype(np.int64)
        mask = np.ones((n, seq), dtype=np.int64)
        mask[:, seq - 2 :] = 0
        arrays[f"X_{split}__input_ids"] = ids
        arrays[f"X_{split}__attention_mask"] = mask
        arrays[f"y_{split}"] = ids[:, 0] % 4
    np.savez(path, **arrays)
