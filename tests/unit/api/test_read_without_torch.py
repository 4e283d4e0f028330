"""Reading a job never validates its spec against the step registry (which loads torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modules.core.records import JobRecord, JobStatus

# In a fresh interpreter: a GET of a stored job, then whether torch was imported.
SCRIPT = """
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from api.main import create_app
from tests.unit.api.conftest import ALICE, make_settings

root = Path(sys.argv[1])
with TestClient(create_app(make_settings(root))) as client:
    got = client.get("/v1/jobs/old1", headers=ALICE)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["status"] == "COMPLETED" and body["steps"][0]["name"] == "a_removed_step", body
    assert client.get("/v1/jobs", headers=ALICE).json()["count"] == 1
sys.exit(3 if "torch" in sys.modules else 0)
"""


def test_get_of_an_old_job_whose_step_was_removed_loads_no_torch(tmp_path: Path) -> None:
    from modules.storage.jobs import SqliteJobStore

    # A job stored before its step was removed: its spec no longer validates.
    spec = {"job_id": "old1", "user_id": "alice", "steps": [{"name": "a_removed_step"}]}
    record = JobRecord(
        job_id="old1", user_id="alice", status=JobStatus.COMPLETED, spec=spec, n_steps=1
    )
    assert SqliteJobStore(tmp_path / "jobs.sqlite").create(record)
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_spec_is_parsed_only_when_asked(tmp_path: Path) -> None:
    import pytest

    from modules.errors import BadInputError

    spec = {"job_id": "old2", "user_id": "alice", "steps": [{"name": "a_removed_step"}]}
    record = JobRecord.model_validate(
        {"job_id": "old2", "user_id": "alice", "spec": spec, "n_steps": 1}
    )
    assert record.profile_name == "edge-8mb" and record.step_name(0) == "a_removed_step"
    with pytest.raises(BadInputError, match="a_removed_step"):
        record.spec_model()
