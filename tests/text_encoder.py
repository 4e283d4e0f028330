"""The bring-your-own-ONNX test transformer, for tests and benchmarks only.

Not a tree arch: it reads token ids and an attention mask instead of flat float features, so
it never goes through build_model or the .pt format (its modules stay off the allow-list).
Its one job is to produce an ONNX file with named integer inputs and an embedding output
(`text_encoder_onnx`), which tests and the int8 search benchmark upload as a BYO model.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from modules.errors import BadInputError
from modules.storage.arch_tree import MAX_LIST_LEN, MAX_PARAMS, check_width, float_in, int_in

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
        "vocab_size": int_in(2, 1_000_000)(vocab_size, "text_encoder.vocab_size"),
        "max_len": int_in(1, 65_536)(max_len, "text_encoder.max_len"),
        "dim": check_width(dim, "text_encoder.dim"),
        "heads": int_in(1, 1024)(heads, "text_encoder.heads"),
        "layers": int_in(1, MAX_LIST_LEN)(layers, "text_encoder.layers"),
        "ff_dim": check_width(ff_dim, "text_encoder.ff_dim"),
    }
    spread = float_in(0.0, 4.0)(channel_spread, "text_encoder.channel_spread")
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
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(rows, seq_len), dtype=np.int64)
    lengths = rng.integers(min(4, seq_len), seq_len + 1, size=rows)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def text_encoder_onnx(model: TextEncoder, *, opset: int = 17) -> bytes:
    """ONNX bytes: int64 input_ids, attention_mask (batch, seq) -> float embedding (batch, dim)."""
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
