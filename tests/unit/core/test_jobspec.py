import json

import pytest

from modules.core.jobspec import load_job_file, parse_job_spec
from modules.core.profiles import BUILTIN_PROFILES, get_profile
from modules.errors import BadInputError, NotFoundError


def spec(**over):
    base = {"steps": [{"name": "train", "params": {"model": "mlp"}}, {"name": "measure"}]}
    base.update(over)
    return base


def test_valid_spec_gets_a_job_id_and_profile():
    job = parse_job_spec(spec())
    assert len(job.job_id) == 16
    assert job.profile_obj.name == "edge-8mb"
    assert job.profile_obj.compute_scale == 0.75


def test_bad_param_names_step_field_and_value():
    with pytest.raises(BadInputError) as info:
        parse_job_spec(
            spec(steps=[{"name": "measure", "params": {"runs": 1.5}}], model="users/a/m.pt")
        )
    msg = str(info.value)
    assert "steps[0] (measure)" in msg and "runs=1.5" in msg


def test_extra_field_is_refused():
    with pytest.raises(BadInputError, match="bogus"):
        parse_job_spec(spec(bogus=1))


def test_unknown_step_lists_known():
    with pytest.raises(BadInputError, match="unknown step 'prune_everything'.*measure"):
        parse_job_spec(spec(steps=[{"name": "prune_everything"}]))


def test_unknown_profile_lists_known():
    with pytest.raises(BadInputError, match="unknown profile 'tiny'.*edge-8mb"):
        parse_job_spec(spec(profile="tiny"))


def test_inline_budget_is_validated():
    job = parse_job_spec(spec(profile={"memory_budget_mb": 4, "compute_scale": 0.5, "power_w": 1}))
    assert job.profile_obj.name == "custom" and job.profile_obj.memory_budget_mb == 4
    with pytest.raises(BadInputError, match="compute_scale"):
        parse_job_spec(spec(profile={"memory_budget_mb": 4, "compute_scale": 0, "power_w": 1}))


def test_first_step_needs_a_model_unless_train():
    with pytest.raises(BadInputError, match="needs an input model"):
        parse_job_spec(spec(steps=[{"name": "measure"}]))


def test_builtin_profiles():
    assert {"edge-8mb", "mcu-256kb", "mobile", "cloud-cpu"} <= set(BUILTIN_PROFILES)
    mcu = get_profile("mcu-256kb")
    assert mcu.memory_budget_mb == 0.25 and mcu.flash_mb == 1
    with pytest.raises(NotFoundError):
        get_profile("nope")


def test_job_file_yaml_and_json(tmp_path):
    (tmp_path / "job.yaml").write_text("steps:\n  - name: train\n    params: {model: knn}\n")
    assert load_job_file(tmp_path / "job.yaml").steps[0].params == {"model": "knn"}
    (tmp_path / "job.json").write_text(json.dumps(spec()))
    assert load_job_file(tmp_path / "job.json").steps[1].name == "measure"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInputError, match="not valid json"):
        load_job_file(tmp_path / "bad.json")
    with pytest.raises(BadInputError, match="not found"):
        load_job_file(tmp_path / "missing.yaml")
