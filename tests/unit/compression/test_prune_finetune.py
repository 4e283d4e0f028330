"""The pruning step's fine-tune: distillation from the unpruned input, cosine learning rate."""

import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from modules.compression.prune_structured import PruneParams, prune_step
from modules.core.artifact import ModelArtifact
from modules.training.finetune import cosine_lr, fit
from modules.training.kd import kd_loss, teacher_loss
from tests.unit.conftest import make_ctx


def weights(artifact: ModelArtifact) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in artifact.obj.state_dict().items()}


def run(small_mlp, data, tmp_path, **params):
    return prune_step(small_mlp, data, PruneParams(**params), make_ctx(tmp_path))


def shuffled_labels(data):
    """The same data with the train labels permuted: a label-driven fine-tune sees noise."""
    perm = np.random.default_rng(0).permutation(len(data.y_train))
    return dataclasses.replace(data, y_train=data.y_train[perm])


@pytest.mark.parametrize("method", ["structured", "unstructured"])
def test_distill_weight_one_trains_on_the_teacher_alone(small_mlp, digits, tmp_path, method):
    common = {"method": method, "amount": 0.5, "finetune_epochs": 2, "distill_weight": 1.0}
    before = weights(small_mlp)
    true = run(small_mlp, digits, tmp_path, **common)
    noise = run(small_mlp, shuffled_labels(digits), tmp_path, **common)
    # The labels weigh nothing: permuting them changes nothing, so the targets came from
    # the teacher (the unpruned input), which the step left as it was.
    for name, tensor in weights(true.model).items():
        assert torch.equal(tensor, weights(noise.model)[name]), name
    assert all(torch.equal(t, small_mlp.obj.state_dict()[k]) for k, t in before.items())
    untuned = run(small_mlp, digits, tmp_path, method=method, amount=0.5, finetune_epochs=0)
    m = true.metrics
    assert m["distill"] == {
        "teacher": "the unpruned input model",
        "weight": 1.0,
        "temperature": 4.0,
    }
    # Fine-tuning on the teacher alone moved the pruned copy back towards it.
    assert m["label_agreement"] > untuned.metrics["label_agreement"] + 0.03
    assert m["accuracy"] > m["accuracy_after_transform"]


def test_without_distillation_the_labels_drive_the_fine_tune(small_mlp, digits, tmp_path):
    common = {"amount": 0.5, "finetune_epochs": 3, "lr": 0.01, "lr_schedule": "constant"}
    true = run(small_mlp, digits, tmp_path, **common)
    noise = run(small_mlp, shuffled_labels(digits), tmp_path, **common)
    assert "distill" not in true.metrics
    assert true.metrics["accuracy"] > noise.metrics["accuracy"] + 0.5


def test_teacher_loss_is_kd_loss_on_the_teachers_logits_and_leaves_it_untrained():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss_fn = teacher_loss(teacher, temperature=2.0, alpha=0.6)
    logits = student(x)
    loss = loss_fn(logits, (x,), y)
    expected = kd_loss(logits, teacher(x).detach(), y, temperature=2.0, alpha=0.6)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()))
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    assert not teacher.training


def test_gradual_pruning_distils_too(small_mlp, digits, tmp_path):
    params = {
        "method": "gradual",
        "amount": 0.5,
        "prune_epochs": 1,
        "finetune_epochs": 1,
        "frequency": 5,
        "distill_weight": 1.0,
    }
    true = run(small_mlp, digits, tmp_path, **params)
    noise = run(small_mlp, shuffled_labels(digits), tmp_path, **params)
    assert true.metrics["distill"]["weight"] == 1.0
    for name, tensor in weights(true.model).items():
        assert torch.equal(tensor, weights(noise.model)[name]), name


def test_cosine_lr_runs_from_lr_to_zero():
    assert cosine_lr(0, total=100, lr=1e-3) == pytest.approx(1e-3)
    assert cosine_lr(50, total=100, lr=1e-3) == pytest.approx(5e-4)
    assert cosine_lr(100, total=100, lr=1e-3) == pytest.approx(0.0)
    assert cosine_lr(150, total=100, lr=1e-3) == pytest.approx(0.0)  # held past the end


def test_fit_with_cosine_changes_the_run_and_the_step_records_it(small_mlp, digits, tmp_path):
    x, y = digits.X_train[:256], digits.y_train[:256]
    runs = {}
    for schedule in ("constant", "cosine"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 10))
        torch.manual_seed(0)
        model.load_state_dict(torch.nn.Sequential(torch.nn.Linear(64, 10)).state_dict())
        fit(model, x, y, epochs=2, lr=0.05, seed=0, lr_schedule=schedule)
        runs[schedule] = model[0].weight.detach().clone()
    assert not torch.equal(runs["constant"], runs["cosine"])
    out = run(small_mlp, digits, tmp_path, amount=0.5, finetune_epochs=1, lr_schedule="cosine")
    assert out.metrics["finetune"]["lr_schedule"] == "cosine"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("distill_weight", -0.1),
        ("distill_weight", 1.5),
        ("distill_temperature", 0),
        ("distill_temperature", 101),
        ("lr_schedule", "step"),
    ],
)
def test_fine_tune_params_are_bounded(field, value):
    with pytest.raises(ValidationError, match=field):
        PruneParams(**{field: value})


def test_defaults_fine_tune_on_the_labels_with_a_cosine_lr():
    params = PruneParams()
    assert (params.distill_weight, params.lr_schedule) == (0.0, "cosine")
