"""POST /v1/jobs with a `goal`: compress to a budget in one call, over the embedded stack."""

from __future__ import annotations

import json

import pytest

ALICE = {"X-API-Key": "alice-key-0001"}
# A short search: the input model and the first candidates only, so the test stays quick.
QUICK = {"max_drop": 50, "max_time_s": 1}


def test_goal_job_runs_compress_and_hands_back_a_gated_onnx(api, torch_model_bytes):
    model_id = api.upload(torch_model_bytes).json()["id"]
    response = api.submit({"model_id": model_id, "goal": {"profile": "edge-8mb", **QUICK}})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["profile"] == "edge-8mb"
    assert [s["name"] for s in job["steps"]] == ["compress"]
    assert job["steps"][0]["params"]["max_drop"] == 50
    done = api.wait_for(job["id"])
    assert done["status"] == "COMPLETED", done["reason"]
    record = done["records"][0]
    assert record["output_key"].endswith("model.onnx")
    assert record["metrics"]["winner"]["parity"]["passed"]
    names = {
        a["name"]
        for a in api.client.get(f"/v1/jobs/{job['id']}/artifacts", headers=ALICE).json()["data"]
    }
    assert {"model.onnx", "report.html", "compress.json", "deployment_report.json"} <= names


def test_goal_nobody_meets_is_rejected_with_the_numbers(api, torch_model_bytes):
    model_id = api.upload(torch_model_bytes).json()["id"]
    impossible = {"memory_budget_mb": 1e-6, "compute_scale": 1, "power_w": 1}
    job = api.submit({"model_id": model_id, "goal": {"profile": impossible, **QUICK}}).json()
    done = api.wait_for(job["id"])
    assert done["status"] == "REJECTED"
    assert "no candidate met the goal" in done["reason"] and "> budget 1e-06 MB" in done["reason"]
    summary = done["records"][0]["metrics"]
    assert summary["outcome"] == "rejected" and summary["winner"] is not None


@pytest.mark.parametrize(
    ("goal", "extra", "needle"),
    [
        ({"profile": "no-such-profile"}, {}, "goal.profile"),
        ({"max_drop": -1}, {}, "goal.max_drop"),
        ({"objective": "speed"}, {}, "goal.objective"),
        ({"max_time_s": 0}, {}, "goal.max_time_s"),
        ({"profile": {"memory_budget_mb": -1}}, {}, "goal.profile"),
        ({"max_drops": 1}, {}, "goal.max_drops"),
        ({}, {"steps": [{"name": "measure"}]}, "not both"),
        ({}, {"profile": "mobile"}, "goal.profile"),
    ],
)
def test_bad_goal_is_422_naming_the_field(api, torch_model_bytes, goal, extra, needle):
    model_id = api.upload(torch_model_bytes).json()["id"]
    response = api.submit({"model_id": model_id, "goal": goal, **extra})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and needle in json.dumps(error)
    assert api.client.get("/v1/jobs", headers=ALICE).json()["count"] == 0


def test_neither_steps_nor_goal_is_422(api):
    response = api.submit({"dataset": "digits"})
    assert response.status_code == 422 and "either `steps` or `goal`" in response.text
