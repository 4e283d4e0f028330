"""lift_layers: layer calls become modules, and shape arithmetic stays dynamic for ONNX."""

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from modules.deployment.onnx_export import export_torch
from modules.storage.datasets import load_dataset
from modules.storage.graph_layers import lift_layers
from modules.storage.inputs import TensorSpec, as_named_inputs
from tests.text_encoder import text_encoder, text_encoder_inputs
from tests.unit.byo_models import TOKEN_INPUTS, ToyTransformer, example_inputs, token_dataset_npz


def _args(n: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(v) for v in example_inputs(TOKEN_INPUTS, n=n).values())


def test_an_exported_attention_graph_exports_to_onnx_with_a_dynamic_batch_and_length(tmp_path):
    # Exported attention reshapes with sizes read from the input; the ONNX export must keep
    # them as graph values, not the batch and length of the rows it was traced on.
    torch.manual_seed(0)
    model = ToyTransformer(num_classes=4).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(model, _args(3), dynamic_shapes=({0: auto, 1: auto},) * 2)
    lifted = lift_layers(program.module())
    assert not any(n.target is torch.ops.aten.sym_size.int for n in lifted.graph.nodes)
    specs = [TensorSpec(s["name"], s["dtype"], ("batch", None)) for s in TOKEN_INPUTS]
    token_dataset_npz(tmp_path / "tokens.npz")
    sample = load_dataset(str(tmp_path / "tokens.npz")).X_test[:3]
    proto = export_torch(lifted, in_features=0, inputs=specs, sample=sample)
    session = ort.InferenceSession(proto.SerializeToString())
    for n, seq in ((1, 12), (5, 12), (2, 7)):
        feeds = example_inputs(TOKEN_INPUTS, n=n, dynamic=seq, seed=n)
        got = session.run(None, feeds)[0]
        want = model(*(torch.from_numpy(v) for v in feeds.values())).detach().numpy()
        assert got.shape == (n, 4)
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert isinstance(lifted.get_submodule("layer.linear1"), nn.Linear)


def test_positions_from_the_sequence_length_stay_dynamic_in_onnx():
    # torch.arange(input_ids.shape[1]) exports as aten.arange on a size read from the input.
    model = text_encoder(layers=1)
    data = text_encoder_inputs(rows=3, seq_len=8, vocab_size=256)
    names = ("input_ids", "attention_mask")
    auto = torch.export.Dim.AUTO
    args = tuple(torch.from_numpy(data[k]) for k in names)
    program = torch.export.export(model, args, dynamic_shapes=({0: auto, 1: auto},) * 2)
    lifted = lift_layers(program.module())
    assert any(n.target is torch.arange for n in lifted.graph.nodes)
    specs = [TensorSpec(k, "int64", ("batch", None)) for k in names]
    proto = export_torch(lifted, in_features=0, inputs=specs, sample=as_named_inputs(data))
    session = ort.InferenceSession(proto.SerializeToString())
    for n, seq in ((1, 5), (6, 12)):
        feeds = text_encoder_inputs(rows=n, seq_len=seq, vocab_size=256, seed=n)
        want = model(*(torch.from_numpy(feeds[k]) for k in names)).detach().numpy()
        np.testing.assert_allclose(session.run(None, feeds)[0], want, atol=1e-4)
