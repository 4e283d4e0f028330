"""Every torch step on models the project did not write (the agreed .pt2 in-memory form)."""

import numpy as np
import pytest
import torch
from torch import nn

from modules.compression.distill import DistillParams, distill_step
from modules.compression.lowrank import LowRankParams, lowrank_step
from modules.compression.prune_structured import PruneParams, prune_step, prune_structured
from modules.deployment.onnx_export import OnnxExportParams, export_model
from modules.deployment.parity import ParityParams, check_output_parity, check_parity
from modules.errors import BadInputError, IncompatibleError
from modules.evaluation.measure import MeasureParams, measure
from modules.evaluation.profile import ProfileParams, profile
from modules.storage.datasets import load_dataset
from modules.storage.graph_layers import lift_layers
from modules.storage.inputs import dataset_feeds, onnx_inputs
from modules.storage.model_formats import load_model, save_model
from tests.unit.byo_models import (
    IMAGE_INPUTS,
    TOKEN_INPUTS,
    ResidualMLP,
    SmallResNet,
    ToyTransformer,
    byo_artifact,
    example_inputs,
    exported,
    token_dataset_npz,
)

MLP_INPUTS = [{"name": "x", "shape": [64], "dtype": "float32"}]
FAST_TIMING = {"runs": 3, "warmup": 1, "max_time_s": 0.05}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def digits32():
    return load_dataset("digits32")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokens.npz"
    token_dataset_npz(path)
    return load_dataset(str(path))


# --- lifting an exported graph's layers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "inputs"),
    [(ResidualMLP, MLP_INPUTS), (SmallResNet, IMAGE_INPUTS), (ToyTransformer, TOKEN_INPUTS)],
)
def test_lifted_layers_compute_the_same_and_keep_the_state_dict_keys(make, inputs):
    torch.manual_seed(0)
    original = make().eval()
    program = exported(original, inputs)
    lifted = lift_layers(program)
    args = tuple(torch.from_numpy(v) for v in example_inputs(inputs, n=4, seed=1).values())
    assert torch.allclose(lifted(*args), original(*args), atol=1e-5)
    assert sorted(lifted.state_dict()) == sorted(original.state_dict())
    assert any(isinstance(m, nn.Linear) for m in lifted.modules())
    lifted.train()  # the exported module refuses train(); the lifted one trains
    lifted.eval()


# --- structured pruning --------------------------------------------------------------------------


@pytest.mark.parametrize("as_program", [False, True])
def test_structured_pruning_through_a_residual_add_keeps_the_output_shape(as_program):
    torch.manual_seed(0)
    model = ResidualMLP().eval()
    source = exported(model, MLP_INPUTS) if as_program else model
    x = torch.randn(5, 64)
    pruned = prune_structured(source, amount=0.5, in_features=64, example_inputs=(x[:2],))
    assert pruned(x).shape == (5, 10)
    assert n_params(pruned) < 0.5 * n_params(model)
    widths = {n: m.out_features for n, m in pruned.named_modules() if isinstance(m, nn.Linear)}
    # stem and the block's last layer feed the same add: they keep equal widths.
    assert widths["stem"] == widths["block.2"] < 48
    assert pruned.get_submodule("norm").normalized_shape == (widths["stem"],)


def test_structured_pruning_of_a_resnet_program_drops_channels(digits32, ctx_factory):
    torch.manual_seed(0)
    artifact = byo_artifact(exported(SmallResNet(), IMAGE_INPUTS), IMAGE_INPUTS)
    params = PruneParams(method="structured", amount=0.5, finetune_epochs=1)
    out = prune_step(artifact, digits32, params, ctx_factory())
    pruned = out.model.obj
    assert out.metrics["params_after"] < 0.5 * out.metrics["params_before"]
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert out.model.meta["format"] == "pt2" and out.model.meta["inputs"] == IMAGE_INPUTS
    assert "in_features" not in out.model.meta
    # The output is stored and loads back the same way (.pt2).
    back = load_model(save_model(out.model))
    x = torch.from_numpy(digits32.X_test[:4])
    assert torch.allclose(back.obj(x), pruned(x), atol=1e-4)


def test_structured_pruning_refuses_a_reshape_to_a_literal_width():
    class FixedView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).view(-1, 4, 4).flatten(1))

    with pytest.raises(BadInputError, match="broke the model's graph"):
        prune_structured(
            FixedView(), amount=0.5, in_features=8, example_inputs=(torch.randn(2, 8),)
        )


def test_structured_pruning_of_a_two_input_module(tokens, ctx_factory):
    torch.manual_seed(0)
    artifact = byo_artifact(ToyTransformer(num_classes=4), TOKEN_INPUTS)
    out = prune_step(
        artifact,
        tokens,
        PruneParams(method="structured", amount=0.5, finetune_epochs=1),
        ctx_factory(),
    )
    assert out.metrics["params_after"] < out.metrics["params_before"]
    ids = torch.from_numpy(tokens.X_test["input_ids"][:3])
    assert out.model.obj(ids, torch.ones_like(ids)).shape == (3, 4)


# --- unstructured, gradual, low-rank -------------------------------------------------------------


@pytest.mark.parametrize("method", ["unstructured", "gradual"])
def test_unstructured_and_gradual_pruning_of_a_program(method, digits, ctx_factory):
    torch.manual_seed(0)
    artifact = byo_artifact(exported(ResidualMLP(), MLP_INPUTS), MLP_INPUTS)
    params = PruneParams(method=method, amount=0.5, finetune_epochs=1, prune_epochs=1)
    out = prune_step(artifact, digits, params, ctx_factory())
    assert out.metrics["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert out.model.meta["inputs"] == MLP_INPUTS


def test_lowrank_factorizes_linear_and_conv_of_programs(digits, digits32, ctx_factory):
    torch.manual_seed(0)
    mlp = byo_artifact(exported(ResidualMLP(), MLP_INPUTS), MLP_INPUTS)
    out = lowrank_step(mlp, digits, LowRankParams(ratio=0.25, finetune_epochs=0), ctx_factory())
    assert out.metrics["params_after"] < out.metrics["params_before"]
    assert out.model.obj(torch.zeros(2, 64)).shape == (2, 10)
    cnn = byo_artifact(exported(SmallResNet(width=16), IMAGE_INPUTS), IMAGE_INPUTS)
    params = LowRankParams(ratio=0.25, conv=True, finetune_epochs=0)
    out = lowrank_step(cnn, digits32, params, ctx_factory())
    replaced = [r for r in out.metrics["layers"] if r["replaced"]]
    assert any(r["type"] == "Conv2d" for r in replaced)
    assert out.model.obj(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# --- distillation --------------------------------------------------------------------------------


def test_distill_an_image_program_into_a_zoo_student_and_a_pruned_copy(digits32, ctx_factory):
    torch.manual_seed(0)
    teacher = byo_artifact(exported(SmallResNet(), IMAGE_INPUTS), IMAGE_INPUTS)
    zoo = distill_step(
        teacher,
        digits32,
        DistillParams(student_arch={"name": "mlp", "hidden": [16]}, epochs=1, timing_runs=2),
        ctx_factory(),
    )
    assert zoo.model.obj(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert zoo.model.meta["inputs"] == IMAGE_INPUTS
    pruned = distill_step(
        teacher,
        digits32,
        DistillParams(student_prune=0.5, epochs=1, timing_runs=2),
        ctx_factory(),
    )
    assert pruned.metrics["params_after"] < 0.5 * pruned.metrics["params_before"]


def test_a_zoo_student_for_named_inputs_is_refused_by_name(tokens, ctx_factory):
    teacher = byo_artifact(ToyTransformer(num_classes=4), TOKEN_INPUTS)
    with pytest.raises(IncompatibleError, match="input_ids"):
        distill_step(teacher, tokens, DistillParams(epochs=1), ctx_factory())


# --- measure, profile, ONNX export and parity ----------------------------------------------------


def test_measure_and_profile_a_two_input_program(tokens, ctx_factory):
    artifact = byo_artifact(exported(ToyTransformer(num_classes=4), TOKEN_INPUTS), TOKEN_INPUTS)
    out = measure(artifact, tokens, MeasureParams(batch_sizes=[1, 8], **FAST_TIMING), ctx_factory())
    assert 0 <= out.metrics["accuracy"] <= 1 and out.metrics["n_test"] == 48
    assert out.metrics["latency_ms"]["b8"]["batch_size"] == 8
    prof = profile(artifact, tokens, ProfileParams(batch_size=4, runs=2, warmup=0), ctx_factory())
    assert prof.metrics["totals"]["flops"] > 0


def test_onnx_export_keeps_named_inputs_and_a_dynamic_batch(tokens, digits32):
    torch.manual_seed(0)
    text = byo_artifact(ToyTransformer(num_classes=4), TOKEN_INPUTS)
    onnx_model, _ = export_model(text, tokens, OnnxExportParams())
    specs = onnx_inputs(onnx_model.obj)
    assert [(s.name, s.dtype) for s in specs] == [
        ("input_ids", "int64"),
        ("attention_mask", "int64"),
    ]
    assert all(isinstance(s.shape[0], str) and isinstance(s.shape[1], str) for s in specs)
    feeds = dataset_feeds(specs, tokens.X_test, dataset=tokens.name)
    report, verdict = check_output_parity(text, onnx_model, feeds, ParityParams(**FAST_TIMING))
    assert verdict.passed, verdict.reason
    image = byo_artifact(exported(SmallResNet(), IMAGE_INPUTS), IMAGE_INPUTS)
    onnx_image, _ = export_model(image, digits32, OnnxExportParams())
    assert onnx_inputs(onnx_image.obj)[0].shape[1:] == (3, 32, 32)
    report, verdict = check_parity(image, onnx_image, digits32, ParityParams(**FAST_TIMING))
    assert verdict.passed and report["agreement"] == 1.0


def test_a_model_the_dataset_cannot_feed_is_refused_naming_the_input(digits, ctx_factory):
    artifact = byo_artifact(SmallResNet(), IMAGE_INPUTS)
    with pytest.raises(IncompatibleError, match=r"input x \(float32 \[batch, 3, 32, 32\]\)"):
        measure(artifact, digits, MeasureParams(**FAST_TIMING), ctx_factory())
    params = PruneParams(method="structured", amount=0.5, finetune_epochs=0)
    with pytest.raises(IncompatibleError, match="X_train__<input>"):
        prune_step(byo_artifact(ToyTransformer(), TOKEN_INPUTS), digits, params, ctx_factory())


def test_flat_rows_feed_a_model_whose_sample_shape_holds_as_many_values(digits, ctx_factory):
    inputs = [{"name": "x", "shape": [1, 8, 8], "dtype": "float32"}]
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    out = measure(byo_artifact(model, inputs), digits, MeasureParams(**FAST_TIMING), ctx_factory())
    assert out.metrics["n_test"] == len(digits.y_test)
    assert np.isfinite(out.metrics["latency_ms"]["b64"]["median"])


def test_student_prune_is_its_own_student_source():
    assert DistillParams(student_prune=0.5).student_prune == 0.5
    with pytest.raises(ValueError, match="student_prune makes the student from the teacher"):
        DistillParams(student_prune=0.5, student_arch={"name": "mlp", "hidden": [8]})
    with pytest.raises(ValueError, match="less than 1"):
        DistillParams(student_prune=1.0)
