"""quantize_dynamic on .pt2 programs: lifted Linear layers become int8 and stay int8 when stored."""

import torch
from torch import nn

from modules.compression.quantize_dynamic import QuantizeParams, quantize_step
from modules.core.jobspec import parse_job_spec
from modules.pipeline.local import LocalWorkspace
from modules.storage.datasets import load_dataset
from modules.storage.graph_layers import lift_layers
from modules.storage.layers import Float16Linear, Int8Linear
from modules.storage.model_formats import load_model, save_model
from tests.unit.byo_models import (
    TOKEN_INPUTS,
    ResidualMLP,
    ToyTransformer,
    byo_artifact,
    example_inputs,
    exported,
    token_dataset_npz,
)

MLP_INPUTS = [{"name": "x", "shape": [64], "dtype": "float32"}]


def _int8_layers(module: nn.Module) -> list[str]:
    return sorted(n for n, m in lift_layers(module).named_modules() if isinstance(m, Int8Linear))


def test_a_lifted_mlp_program_gets_int8_linears_a_smaller_file_and_close_outputs(
    digits, ctx_factory
):
    torch.manual_seed(0)
    source = ResidualMLP(width=256).eval()
    artifact = byo_artifact(exported(source, MLP_INPUTS), MLP_INPUTS)
    out = quantize_step(artifact, digits, QuantizeParams(), ctx_factory())
    assert out.metrics["quantized_layers"] == ["stem", "block.0", "block.2", "head"]
    assert _int8_layers(out.model.obj) == ["block.0", "block.2", "head", "stem"]
    assert out.metrics["label_agreement"] >= 0.95
    assert out.metrics["size_ratio"] > 3.5  # tensor bytes: int8 weights + fp32 scales
    # Stored as .pt2 (re-exported, the int8 tensors kept), it loads back through the safe
    # loader, lifts to Int8Linear again and computes what the quantized module computes.
    stored_in, stored_out = save_model(artifact), save_model(out.model)
    assert len(stored_out) < 0.4 * len(stored_in)
    back = load_model(stored_out)
    assert back.meta["format"] == "pt2" and back.meta.get("quantized") == "int8"
    assert _int8_layers(back.obj) == ["block.0", "block.2", "head", "stem"]
    x = torch.from_numpy(digits.X_test[:32]).float()
    with torch.no_grad():
        want, got, lifted = source(x), back.obj(x), lift_layers(back.obj)(x)
        assert torch.allclose(lifted, out.model.obj(x), atol=1e-5)
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.05 * scale and (lifted - want).abs().max() < 0.05 * scale


def test_a_transformer_pt2_is_quantized_through_the_store_and_round_trips(tmp_path):
    torch.manual_seed(0)
    data_path = tmp_path / "tokens.npz"
    token_dataset_npz(data_path)
    model = ToyTransformer(dim=128, num_classes=4).eval()
    args = tuple(torch.from_numpy(v) for v in example_inputs(TOKEN_INPUTS, n=3).values())
    auto = torch.export.Dim.AUTO
    upload = tmp_path / "encoder.pt2"
    program = torch.export.export(model, args, dynamic_shapes=({0: auto, 1: auto},) * 2)
    torch.export.save(program, upload)
    ws = LocalWorkspace(tmp_path / "ws")
    key = ws.import_model(upload, user_id="local")
    spec = parse_job_spec(
        {
            "job_id": "q8",
            "model": key,
            "dataset": str(data_path),
            "steps": [{"name": "quantize_dynamic"}],
        }
    )
    result = ws.run(spec)
    assert result.status == "COMPLETED", result.reason
    (record,) = result.records
    quantized = {"layer.self_attn.out_proj", "layer.linear1", "layer.linear2", "head"}
    assert set(record.metrics["quantized_layers"]) == quantized
    # The fused in_proj is a raw parameter of the graph, not a Linear: it stays float32.
    assert record.metrics["kept_float32"] == ["layer.self_attn"]
    assert record.output_size < 0.75 * record.input_size
    back = load_model(ws.store.get_bytes(record.output_key))
    assert set(_int8_layers(back.obj)) == quantized
    tokens = load_dataset(str(data_path))
    ids = torch.from_numpy(tokens.X_test["input_ids"][:8])
    mask = torch.from_numpy(tokens.X_test["attention_mask"][:8])
    with torch.no_grad():
        want, got = model(ids, mask), back.obj(ids, mask)
    assert got.shape == want.shape == (8, 4)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_float16_program_is_stored_at_half_size_and_lifts_back_to_float16_layers(
    digits, ctx_factory
):
    torch.manual_seed(0)
    artifact = byo_artifact(exported(ResidualMLP(width=256).eval(), MLP_INPUTS), MLP_INPUTS)
    out = quantize_step(artifact, digits, QuantizeParams(dtype="float16"), ctx_factory())
    stored = save_model(out.model)
    assert len(stored) < 0.6 * len(save_model(artifact))
    back = load_model(stored)
    lifted = lift_layers(back.obj)
    halves = sorted(n for n, m in lifted.named_modules() if isinstance(m, Float16Linear))
    assert halves == ["block.0", "block.2", "head", "stem"]
    x = torch.from_numpy(digits.X_test[:16]).float()
    with torch.no_grad():
        assert torch.equal(lifted(x), out.model.obj(x)) and torch.equal(back.obj(x), lifted(x))
