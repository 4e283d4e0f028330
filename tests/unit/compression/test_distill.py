import math

import pytest
import torch
from pydantic import ValidationError

from modules.compression.distill import (
    DistillParams,
    check_student_fits,
    distill,
    kd_loss,
    linear_schedule,
)
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError, IncompatibleError
from modules.pipeline.local import LocalWorkspace, run_single_step
from modules.storage.architectures import build_model
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import save_model

STUDENT = [[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]
TEACHER = [[3.0, 1.0, 0.0], [2.0, 0.0, 0.0]]
LABELS = [2, 0]


def softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def hand_kd(temperature, alpha):
    kl = 0.0
    for s_row, t_row in zip(STUDENT, TEACHER, strict=True):
        p_s, p_t = softmax(s_row, temperature), softmax(t_row, temperature)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    kl /= len(STUDENT)
    ce = -sum(math.log(softmax(row, 1.0)[y]) for row, y in zip(STUDENT, LABELS, strict=True))
    ce /= len(STUDENT)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize(("temperature", "alpha"), [(4.0, 0.7), (1.0, 1.0), (2.0, 0.0)])
def test_kd_loss_equals_hand_computation(temperature, alpha):
    loss = kd_loss(
        torch.tensor(STUDENT, dtype=torch.float64),
        torch.tensor(TEACHER, dtype=torch.float64),
        torch.tensor(LABELS),
        temperature=temperature,
        alpha=alpha,
    )
    assert loss.item() == pytest.approx(hand_kd(temperature, alpha), rel=1e-9)


def test_kd_loss_is_zero_soft_term_when_student_copies_teacher():
    logits = torch.tensor(TEACHER)
    only_soft = kd_loss(logits, logits, torch.tensor(LABELS), temperature=3.0, alpha=1.0)
    assert only_soft.item() == pytest.approx(0.0, abs=1e-6)


def test_linear_schedule_runs_high_to_low():
    assert [linear_schedule(e, epochs=5, start=4.0, end=1.0) for e in range(5)] == [
        4.0,
        3.25,
        2.5,
        1.75,
        1.0,
    ]
    assert linear_schedule(3, epochs=5, start=0.7, end=None) == 0.7


def test_params_validate_schedules_and_student_source():
    with pytest.raises(ValidationError, match="high to low"):
        DistillParams(temperature=2.0, temperature_final=4.0)
    with pytest.raises(ValidationError, match="high to low"):
        DistillParams(alpha=0.5, alpha_final=0.9)
    with pytest.raises(ValidationError, match="not both"):
        DistillParams(student_arch={"name": "mlp", "hidden": [8]}, student_key="users/a/m.pt")
    with pytest.raises(ValidationError, match="users/"):
        DistillParams(student_key="../../etc/passwd")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, digits):
    from modules.training.train import TrainParams, train_baseline

    arch = {"name": "mlp", "hidden": [128]}
    artifact, _ = train_baseline(TrainParams(model="mlp", arch=arch, epochs=8), digits, seed=0)
    path = tmp_path_factory.mktemp("kd") / "teacher.pt"
    path.write_bytes(save_model(artifact))
    return path


def test_distill_is_deterministic_and_leaves_inputs_alone(digits):
    teacher = build_model({"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10})
    student = build_model({"name": "mlp", "in_features": 64, "hidden": [8], "num_classes": 10})
    before = [p.clone() for p in student.parameters()]
    kw = {"epochs": 2, "temperature": 4.0, "temperature_final": 2.0, "seed": 3}
    a, history = distill(teacher, student, digits.X_train, digits.y_train, **kw)
    b, _ = distill(teacher, student, digits.X_train, digits.y_train, **kw)
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), before, strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, p0)
    assert all(torch.equal(p, p0) for p, p0 in zip(student.parameters(), before, strict=True))
    assert [s["temperature"] for s in history["schedule"]] == [4.0, 2.0]


def test_step_compares_teacher_and_student(tmp_path, teacher_file):
    out = tmp_path / "student.pt"
    record = run_single_step(
        "distill",
        {
            "student_arch": {"name": "mlp", "hidden": [16]},
            "epochs": 5,
            "lr": 0.01,
            "timing_runs": 3,
        },
        input_path=teacher_file,
        output_path=out,
    )
    m = record.metrics
    assert m["student"]["size_bytes"] == out.stat().st_size < m["teacher"]["size_bytes"]
    assert m["student"]["params"] < m["teacher"]["params"]
    assert {"b1", "b64"} <= m["teacher"]["latency_ms"].keys() == m["student"]["latency_ms"].keys()
    assert m["size_ratio"] > 5 and m["accuracy"] > 0.7
    # The scaffold's before/after names: before is the teacher, after the student.
    assert m["accuracy_before"] == m["teacher"]["accuracy"]
    assert (m["params_before"], m["params_after"]) == (
        m["teacher"]["params"],
        m["student"]["params"],
    )
    assert m["size_after_bytes"] < record.output_size == out.stat().st_size
    torch.load(out, weights_only=True)


def test_student_from_a_stored_model_keeps_its_arch(tmp_path, teacher_file, digits):
    student = build_model({"name": "mlp", "in_features": 64, "hidden": [24], "num_classes": 10})
    src = tmp_path / "student_in.pt"
    src.write_bytes(save_model(ModelArtifact("torch", student, {})))
    key = LocalWorkspace(tmp_path / "ws").import_model(src, user_id="local")
    out = tmp_path / "student_out.pt"
    record = run_single_step(
        "distill",
        {"student_key": key, "epochs": 2, "timing_runs": 2},
        input_path=teacher_file,
        output_path=out,
        workspace=tmp_path / "ws",
    )
    assert torch.load(out, weights_only=True)["state_dict"]["0.weight"].shape == (24, 64)
    assert record.params["student_key"] == key


def test_mismatched_students_are_refused_naming_both(tmp_path, teacher_file, digits):
    with pytest.raises(IncompatibleError, match="num_classes=5 but the teacher has num_classes=10"):
        run_single_step(
            "distill",
            {"student_arch": {"name": "mlp", "hidden": [8], "num_classes": 5}},
            input_path=teacher_file,
            output_path=tmp_path / "x.pt",
        )
    assert not (tmp_path / "x.pt").exists()
    teacher = build_model({"name": "mlp", "in_features": 64, "hidden": [8], "num_classes": 10})
    wide = build_model({"name": "mlp", "in_features": 32, "hidden": [8], "num_classes": 10})
    with pytest.raises(IncompatibleError, match="student takes 32 input features but the teacher"):
        check_student_fits(wide, teacher, x=digits.X_test)
    few = build_model({"name": "mlp", "in_features": 64, "hidden": [8], "num_classes": 4})
    with pytest.raises(IncompatibleError, match=r"student outputs \[4\].*teacher outputs \[10\]"):
        check_student_fits(few, teacher, x=digits.X_test)


def test_student_of_another_user_is_refused(tmp_path, teacher_file):
    with pytest.raises(BadInputError, match="must belong to the job's user"):
        run_single_step(
            "distill",
            {"student_key": "users/mallory/models/x/model.pt"},
            input_path=teacher_file,
            output_path=tmp_path / "x.pt",
        )
