"""Every hostile file against the running API: a clean 4xx, a log line, nothing run or stored."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.corpus.make_corpus import Specimen, payloads
from tests.devstack import DevStack

pytestmark = pytest.mark.integration

ALICE = {"X-API-Key": "dev-key-alice-0001"}
# Sent through the loaders' own size check only (a 513 MiB body is the CLI's case).
CLI_ONLY = {"oversize_sparse.pt"}


def multipart(filename: bytes, data: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body with the file name as raw bytes (httpx would escape NUL and CR LF)."""
    boundary = f"hostile-{uuid.uuid4().hex}"
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {**ALICE, "Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(
    api: httpx.Client, filename: str, data: bytes, route: str = "/v1/models"
) -> httpx.Response:
    body, headers = multipart(filename.encode("utf-8", "surrogateescape"), data)
    return api.post(route, content=body, headers=headers)


def clean_refusal(response: httpx.Response) -> str | None:
    """None when the response is a 4xx in the error shape; else what is wrong with it."""
    if not 400 <= response.status_code < 500:
        return f"status {response.status_code}: {response.text[:200]}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code} without the error body: {response.text[:200]}"
    if not error.get("code") or not error.get("message"):
        return f"error body without code/message: {error}"
    if "Traceback" in error["message"]:
        return "a stack trace leaked into the response"
    if len(response.content) > 10_000:  # a multi-MB input echoed back is an amplifier
        return f"a {len(response.content):,}-byte error body"
    return None


def attempts(
    api: httpx.Client, corpus: list[Specimen], valid: bytes, model_id: str
) -> list[dict[str, Any]]:
    """Send every specimen every way the API takes it; one row per attempt."""
    rows: list[dict[str, Any]] = []

    def record(
        specimen: Specimen, route: str, response: httpx.Response, expect: str | None = None
    ) -> None:
        problem = clean_refusal(response)
        if problem is None and expect and expect not in response.json()["error"]["message"]:
            problem = f"the refusal does not say {expect!r}: {response.text[:300]}"
        rows.append(
            {
                "name": specimen.name,
                "kind": specimen.kind,
                "what": specimen.what,
                "route": route,
                "status": response.status_code,
                "code": (response.json().get("error") or {}).get("code")
                if response.headers.get("content-type", "").startswith("application/json")
                else None,
                "problem": problem,
            }
        )

    for specimen in corpus:
        if specimen.name in CLI_ONLY:
            continue
        if specimen.kind in ("model", "dataset"):
            assert specimen.path is not None and specimen.upload_name is not None
            data = Path(specimen.path).read_bytes()
            record(specimen, "POST /v1/models", upload(api, specimen.upload_name, data))
            # The same bytes under an accepted extension: content sniffing must catch them.
            record(specimen, "POST /v1/models as .pt", upload(api, "model.pt", data))
        if specimen.kind == "dataset":
            assert specimen.upload_name is not None
            inputs = upload(api, specimen.upload_name, data, route="/v1/inputs")
            record(specimen, "POST /v1/inputs", inputs, expect=specimen.refusal)
            body = {"model_id": model_id, "dataset": specimen.path, "steps": [{"name": "measure"}]}
            record(
                specimen, "POST /v1/jobs dataset", api.post("/v1/jobs", json=body, headers=ALICE)
            )
        if specimen.kind == "filename":
            assert specimen.upload_name is not None
            record(specimen, "POST /v1/models", upload(api, specimen.upload_name, valid))
        if specimen.kind == "jobspec":
            text = str(specimen.body).replace('"steps"', f'"model_id": "{model_id}", "steps"', 1)
            headers = {**ALICE, "Content-Type": "application/json"}
            record(specimen, "POST /v1/jobs", api.post("/v1/jobs", content=text, headers=headers))
    return rows


def test_payloads_are_live(tmp_path: Path) -> None:
    """The corpus's payloads really run code when unpickled naively (so their absence means it)."""
    control = tmp_path / "control-marker"
    for payload in payloads(control).values():
        pickle.loads(pickle.dumps(payload))  # unpickling untrusted data is the point here
        assert control.exists()
        control.unlink()


def test_every_hostile_input_gets_a_clean_4xx_and_nothing_runs_or_is_stored(
    api: httpx.Client, hostile_stack: DevStack, corpus: list[Specimen], marker: Path
) -> None:
    from tests.corpus.make_corpus import checkpoint_bytes

    valid = checkpoint_bytes()
    accepted = upload(api, "control.pt", valid)
    assert accepted.status_code == 201, accepted.text  # the API does take good models
    model_id = accepted.json()["id"]

    rows = attempts(api, corpus, valid, model_id)

    problems = [row for row in rows if row["problem"]]
    assert not problems, json.dumps(problems, indent=2)
    assert not marker.exists(), "a payload ran: the marker file exists"
    # Nothing but the control upload is stored, and only under the user's prefix.
    s3 = boto3.client("s3", endpoint_url=hostile_stack.moto_url, region_name="us-east-1")
    listing = s3.list_objects_v2(Bucket=hostile_stack.env["MODEL_BUCKET"])
    keys = sorted(item["Key"] for item in listing.get("Contents", []))
    assert keys == sorted(
        [f"users/alice/models/{model_id}/model.pt", f"users/alice/models/{model_id}/meta.json"]
    )
    # Every refusal is logged by the API with its status and code.
    api_log = next(p for p in hostile_stack.processes if p.name == "api").log_tail(10_000_000)
    refusals = api_log.count("refused POST /v1/")
    assert refusals >= len(rows), f"{refusals} log lines for {len(rows)} refusals"
    out = os.environ.get("MCAAS_RELIABILITY_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "hostile_api.json").write_text(json.dumps(rows, indent=2))
