"""Structured pruning of exported transformers: FFN neurons removed, attention kept, and why."""

import torch
from torch import nn

from modules.compression.prune_structured import prune_structured, structured_layer_report
from modules.compression.transformer_prune import graph_has_attention, plan_ffn_pruning
from modules.core.jobspec import parse_job_spec
from modules.pipeline.local import LocalWorkspace
from modules.storage.datasets import load_dataset
from modules.storage.graph_layers import lift_layers
from modules.storage.model_formats import load_model
from tests.text_encoder import text_encoder, text_encoder_inputs
from tests.unit.byo_models import TOKEN_INPUTS, ToyTransformer, example_inputs, token_dataset_npz

FAST_TIMING = {"runs": 3, "warmup": 1, "max_time_s": 0.05}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def export_tokens(
    module: nn.Module, args: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    auto = torch.export.Dim.AUTO
    return torch.export.export(
        module.eval(), args, dynamic_shapes=tuple({0: auto, 1: auto} for _ in args)
    )


def token_args(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(v) for v in example_inputs(TOKEN_INPUTS, n=n, seed=seed).values())


class GatedBlock(nn.Module):
    """SDPA attention then a gated MLP (silu(gate(x)) * up(x) -> down), written-out GELU head."""

    def __init__(self, dim: int = 16, hidden: int = 24, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(50, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gate, self.up = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.pre, self.post = nn.Linear(dim, 20), nn.Linear(20, 6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        x = x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        h = self.pre(x.mean(1))
        # The tanh GELU written out: x is used three times before the next Linear.
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * h**3)))
        return self.post(h)


def test_an_exported_transformer_loses_ffn_neurons_and_keeps_its_output_shape():
    torch.manual_seed(0)
    model = ToyTransformer().eval()
    program = export_tokens(model, token_args()).module()
    assert graph_has_attention(lift_layers(program))
    x = token_args(n=5, seed=1)
    pruned = prune_structured(program, amount=0.5, in_features=1, example_inputs=x[:2])
    assert pruned(*x).shape == model(*x).shape == (5, 10)
    assert n_params(pruned) < n_params(model)
    assert pruned.get_submodule("layer.linear1").out_features == 16  # of 32
    assert pruned.get_submodule("layer.linear2").in_features == 16
    # The residual stream and the attention are untouched.
    assert pruned.get_submodule("layer.linear2").out_features == 16
    assert pruned.get_submodule("layer.self_attn.out_proj").weight.shape == (16, 16)
    report = structured_layer_report(lift_layers(program), pruned, {})
    assert report["layers_pruned"]["layer.linear1"] == {
        "out_features": [32, 16],
        "with": "layer.linear2",
    }
    kept = report["layers_kept"]
    assert "emits the logits" in kept["head"]
    assert "attention output projection" in kept["layer.self_attn.out_proj"]
    assert "in_proj" in kept["layer.self_attn"] and "LayerNorm" in kept["layer.norm1"]


def test_removing_zero_neurons_changes_nothing():
    # Neurons with all-zero weights are the least important and contribute nothing, so
    # pruning exactly them must leave the outputs as they were: the slicing is right.
    torch.manual_seed(0)
    model = text_encoder(layers=2, dim=32, ff_dim=64)
    with torch.no_grad():
        for block in model.blocks:
            dead = torch.arange(0, 64, 2)
            block.ff_in.weight[dead] = 0
            block.ff_in.bias[dead] = 0
            block.ff_out.weight[:, dead] = 0
    data = text_encoder_inputs(rows=4, seq_len=8, vocab_size=256, seed=2)
    x = tuple(torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask"))
    program = export_tokens(model, x).module()
    pruned = prune_structured(program, amount=0.5, in_features=1, example_inputs=x)
    for i in range(2):
        assert pruned.get_submodule(f"blocks.{i}.ff_in").out_features == 32
    assert torch.allclose(pruned(*x), model(*x), atol=1e-5)
    report = structured_layer_report(lift_layers(program), pruned, {})
    # Query/key/value are reshaped to head widths before the scores: kept, and said so.
    assert "literal head widths" in report["layers_kept"]["blocks.0.query"]
    assert "attention output projection" in report["layers_kept"]["blocks.1.out"]


def test_gated_mlps_prune_gate_and_up_together_and_written_out_gelu_is_elementwise():
    torch.manual_seed(0)
    model = GatedBlock().eval()
    program = export_tokens(model, token_args()).module()
    plan = plan_ffn_pruning(lift_layers(program), classifier="post")
    groups = {(g.sources, g.sink) for g in plan.groups}
    assert groups == {(("gate", "up"), "down"), (("pre",), "post")}
    assert "literal head widths" in plan.kept["qkv"]
    x = token_args(n=4, seed=3)
    pruned = prune_structured(program, amount=0.5, in_features=1, example_inputs=x)
    assert pruned(*x).shape == (4, 6)
    widths = [pruned.get_submodule(n).out_features for n in ("gate", "up", "pre")]
    assert widths == [12, 12, 10] and pruned.get_submodule("down").in_features == 12


def test_global_scope_ranks_all_ffn_neurons_together():
    torch.manual_seed(0)
    model = GatedBlock().eval()
    with torch.no_grad():
        # Half of `pre`'s neurons nearly dead: globally they rank below every gated neuron.
        model.pre.weight[:10] *= 1e-3
        model.pre.bias[:10] *= 1e-3
        model.post.weight[:, :10] *= 1e-3
    program = export_tokens(model, token_args()).module()
    x = token_args()
    pruned = prune_structured(program, amount=0.25, in_features=1, example_inputs=x, scope="global")
    kept = {n: pruned.get_submodule(n).out_features for n in ("pre", "gate", "up")}
    # 25% of all 44 hidden neurons go: the 10 dead ones first, so `pre` loses at least 10.
    assert kept["pre"] + kept["gate"] == 44 - 11 and kept["gate"] == kept["up"]
    assert kept["pre"] <= 10 and kept["gate"] >= 23
    assert pruned(*x).shape == (3, 6)


def test_layers_skip_and_round_to_apply_to_ffn_groups():
    torch.manual_seed(0)
    program = export_tokens(GatedBlock().eval(), token_args()).module()
    x = token_args()
    pruned = prune_structured(
        program, amount=0.5, in_features=1, example_inputs=x, layers={"gate": "skip"}, round_to=8
    )
    assert pruned.get_submodule("gate").out_features == 24  # skipped, with up and down
    assert pruned.get_submodule("pre").out_features == 16  # 10 rounded up to a multiple of 8
    report = structured_layer_report(lift_layers(program), pruned, {"gate": "skip"})
    assert "skipped by `layers`" in report["layers_kept"]["up"]


def test_a_pt2_transformer_upload_is_pruned_measured_exported_and_passes_parity(tmp_path):
    torch.manual_seed(0)
    data_path = tmp_path / "tokens.npz"
    token_dataset_npz(data_path)
    upload = tmp_path / "encoder.pt2"
    torch.export.save(export_tokens(ToyTransformer(num_classes=4), token_args()), upload)
    ws = LocalWorkspace(tmp_path / "ws")
    key = ws.import_model(upload, user_id="local")
    spec = parse_job_spec(
        {
            "job_id": "tfm",
            "model": key,
            "dataset": str(data_path),
            "steps": [
                {"name": "prune_structured", "params": {"amount": 0.5, "finetune_epochs": 1}},
                {"name": "measure", "params": {"batch_sizes": [4], **FAST_TIMING}},
                {"name": "onnx_export"},
                {"name": "onnx_parity", "params": FAST_TIMING},
            ],
        }
    )
    result = ws.run(spec)
    assert result.status == "COMPLETED", result.reason
    prune, measured, _, parity = result.records
    metrics = prune.metrics
    assert metrics["params_after"] < metrics["params_before"]
    assert metrics["layers_pruned"]["layer.linear1"]["out_features"] == [32, 16]
    assert set(metrics["layers_kept"]) >= {"head", "layer.self_attn.out_proj", "embed"}
    assert parity.verdict["passed"] is True
    assert measured.metrics["latency_ms"]["b4"]["batch_size"] == 4
    # Stored as .pt2, and it loads back through the safe loader with the smaller FFN.
    assert prune.output_key.endswith(".pt2")
    back = load_model(ws.store.get_bytes(prune.output_key))
    assert back.meta["format"] == "pt2"
    assert lift_layers(back.obj).get_submodule("layer.linear1").out_features == 16
    tokens = load_dataset(str(data_path))
    ids = torch.from_numpy(tokens.X_test["input_ids"][:3])
    assert back.obj(ids, torch.ones_like(ids)).shape == (3, 4)
