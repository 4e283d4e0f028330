"""torch_step: the transform gets a copy, fine-tuning runs only when asked, metrics compare."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from modules.compression.quantize_dynamic import quantize_dynamic
from modules.compression.scaffold import Transformed, compare, state_dict_bytes, torch_step
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError, IncompatibleError
from modules.training.finetune import accuracy


@dataclass(frozen=True)
class Tuning:
    finetune_epochs: int = 0
    lr: float = 1e-2
    batch_size: int = 256
    lr_schedule: str = "constant"


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Spy:
    """A transform that halves the first layer's weights and remembers what it was given."""

    def __init__(self, **result: object) -> None:
        self.seen: list[nn.Module] = []
        self.result = result

    def __call__(self, module, data, params, ctx):
        self.seen.append(module)
        with torch.no_grad():
            module[0].weight.mul_(0.5)
        self.transformed = snapshot(module)
        return Transformed(module, {"halved": "0.weight"}, **self.result)


def test_transform_gets_a_copy_and_the_input_is_left_alone(small_mlp, digits, ctx_factory):
    before = snapshot(small_mlp.obj)
    spy = Spy()
    out = torch_step(small_mlp, digits, Tuning(), ctx_factory(), name="t", transform=spy)
    assert len(spy.seen) == 1 and spy.seen[0] is not small_mlp.obj
    assert out.model is not None and out.model.obj is spy.seen[0]
    assert same_weights(snapshot(small_mlp.obj), before)
    assert not same_weights(snapshot(out.model.obj), before)
    assert out.metrics["halved"] == "0.weight"


def test_no_fine_tune_when_the_params_ask_for_none(small_mlp, digits, ctx_factory):
    spy = Spy()
    out = torch_step(small_mlp, digits, Tuning(0), ctx_factory(), name="t", transform=spy)
    assert "finetune" not in out.metrics and "accuracy_after_transform" not in out.metrics
    assert out.model is not None and same_weights(snapshot(out.model.obj), spy.transformed)


def test_fine_tunes_when_asked_and_calls_after_step(small_mlp, digits, ctx_factory):
    steps: list[int] = []
    spy = Spy(after_step=steps.append)
    out = torch_step(small_mlp, digits, Tuning(2), ctx_factory(), name="t", transform=spy)
    m = out.metrics
    batches = -(-len(digits.y_train) // 256)
    assert m["finetune"]["epochs"] == 2 and steps == list(range(1, 2 * batches + 1))
    assert out.model is not None and not same_weights(snapshot(out.model.obj), spy.transformed)
    assert 0 <= m["accuracy_after_transform"] <= 1


@pytest.mark.parametrize("result", [{"trained": True}, {}])
def test_no_fine_tune_for_a_trained_transform_or_a_step_without_it(
    result, small_mlp, digits, ctx_factory
):
    spy = Spy(**result)
    out = torch_step(
        small_mlp,
        digits,
        Tuning(3),
        ctx_factory(),
        name="t",
        transform=spy,
        fine_tune=bool(result),  # {} runs as a step that never fine-tunes
    )
    assert "finetune" not in out.metrics
    assert out.model is not None and same_weights(snapshot(out.model.obj), spy.transformed)


def test_metrics_compare_the_input_with_the_output(small_mlp, digits, ctx_factory):
    def to_linear(module, data, params, ctx):
        torch.manual_seed(0)
        return Transformed(nn.Sequential(nn.Linear(64, 10)), meta={"note": "linear"})

    out = torch_step(
        small_mlp, digits, Tuning(), ctx_factory(), name="t", transform=to_linear, fine_tune=False
    )
    m = out.metrics
    n_before = sum(p.numel() for p in small_mlp.obj.parameters())
    assert m["accuracy_before"] == accuracy(small_mlp.obj, digits.X_test, digits.y_test)
    assert out.model is not None
    assert m["accuracy"] == accuracy(out.model.obj, digits.X_test, digits.y_test)
    assert m["accuracy_drop_pt"] == pytest.approx(100 * (m["accuracy_before"] - m["accuracy"]))
    assert m["params_before"] == n_before and m["params_after"] == 650
    assert m["size_before_bytes"] == 4 * n_before == state_dict_bytes(small_mlp.obj)
    assert m["size_after_bytes"] == 4 * 650
    assert m["size_ratio"] == pytest.approx(n_before / 650)
    assert 0 <= m["label_agreement"] < 1 and m["max_abs_logit_diff"] > 0
    assert out.model.meta["note"] == "linear"
    assert out.model.meta["in_features"] == 64 and out.model.meta["num_classes"] == 10


def test_compare_of_a_model_with_itself_agrees_fully(small_mlp, digits):
    m = compare(small_mlp.obj, small_mlp.obj, digits)
    assert m["label_agreement"] == 1.0 and m["max_abs_logit_diff"] == 0.0
    assert m["accuracy_drop_pt"] == 0.0 and m["size_ratio"] == 1.0


def test_a_fine_tuning_step_refuses_a_quantized_input(small_mlp, digits, ctx_factory):
    quantized, _ = quantize_dynamic(small_mlp.obj)
    artifact = ModelArtifact("torch", quantized, dict(small_mlp.meta))
    with pytest.raises(BadInputError, match="already quantized"):
        torch_step(artifact, digits, Tuning(), ctx_factory(), name="t", transform=Spy())


def test_an_output_that_does_not_fit_the_data_names_the_step(small_mlp, digits, ctx_factory):
    def wrong(module, data, params, ctx):
        return Transformed(nn.Sequential(nn.Linear(64, 3)))

    with pytest.raises(IncompatibleError, match="the t output"):
        torch_step(small_mlp, digits, Tuning(), ctx_factory(), name="t", transform=wrong)
