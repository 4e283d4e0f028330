"""POST/GET /v1/models: streamed upload, safe validation, per-user scoping, clean 4xx errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest

ALICE = {"X-API-Key": "alice-key-0001"}
BOB = {"X-API-Key": "bob-key-00002"}


# A form whose file part never ends (no closing boundary).
TRUNCATED_FORM = b'--B\r\nContent-Disposition: form-data; name="file"; filename="m.pt"\r\n\r\nab'


class _RunsShell:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_upload_torch_checkpoint_stores_it_under_the_user(api, torch_model_bytes) -> None:
    response = api.upload(torch_model_bytes, "my model.pt")
    assert response.status_code == 201
    body = response.json()
    assert body["framework"] == "torch"
    assert body["format"] == "torch-checkpoint"
    assert body["size"] == len(torch_model_bytes)
    assert body["sha256"] == hashlib.sha256(torch_model_bytes).hexdigest()
    assert (body["in_features"], body["num_classes"]) == (64, 10)
    assert body["filename"] == "my model.pt"
    # The key is built server-side from the generated id, never from the client's name.
    assert api.stored_keys() == [
        f"users/alice/models/{body['id']}/meta.json",
        f"users/alice/models/{body['id']}/model.pt",
    ]
    stored = Path(str(api.settings.store_url)) / f"users/alice/models/{body['id']}/model.pt"
    assert stored.read_bytes() == torch_model_bytes


def test_upload_skops_and_read_back(api, sklearn_model_bytes) -> None:
    created = api.upload(sklearn_model_bytes, "knn.skops").json()
    assert created["framework"] == "sklearn" and created["format"] == "skops"
    assert api.client.get(f"/v1/models/{created['id']}", headers=ALICE).json() == created
    listing = api.client.get("/v1/models", headers=ALICE).json()
    assert listing == {"data": [created], "count": 1}


def test_models_are_scoped_to_their_user(api, torch_model_bytes) -> None:
    created = api.upload(torch_model_bytes).json()
    response = api.client.get(f"/v1/models/{created['id']}", headers=BOB)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert api.client.get("/v1/models", headers=BOB).json() == {"data": [], "count": 0}


@pytest.mark.parametrize("model_id", ["nope", "a" * 65, "..%2F..%2Fetc", "x.y"])
def test_unknown_model_id_is_404(api, model_id: str) -> None:
    response = api.client.get(f"/v1/models/{model_id}", headers=ALICE)
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


def test_upload_needs_an_api_key(api, torch_model_bytes) -> None:
    for headers in ({}, {"X-API-Key": "wrong-key-0000"}):
        response = api.client.post("/v1/models", headers=headers, files={"file": ("m.pt", b"x")})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    assert api.stored_keys() == []


def _torch_zip_with_payload(marker: Path) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"arch": {"name": "mlp"}, "state_dict": _RunsShell(marker)}, buffer)
    return buffer.getvalue()


def _bad_uploads(torch_bytes: bytes, marker: Path) -> list[tuple[str, str, bytes, int, str]]:
    truncated_zip = io.BytesIO()
    with zipfile.ZipFile(truncated_zip, "w") as archive:
        archive.writestr("schema.json", json.dumps({"a": 1}) * 100)
    return [
        ("empty file", "model.pt", b"", 400, "bad_input"),
        ("over the size limit", "model.pt", b"\0" * (1024 * 1024 + 1), 413, "too_large"),
        ("pickle extension", "model.pkl", b"\x80\x04K\x01.", 400, "bad_input"),
        ("joblib extension", "model.joblib", b"\x80\x04K\x01.", 400, "bad_input"),
        ("no extension", "model", torch_bytes, 400, "bad_input"),
        ("text file", "notes.txt", b"hello", 400, "bad_input"),
        ("content is not a model", "model.onnx", b"hello, not a graph", 422, "bad_model"),
        ("torch content named .onnx", "model.onnx", torch_bytes, 422, "bad_model"),
        ("raw pickle with code", "model.pt", pickle.dumps(_RunsShell(marker)), 422, "unsafe_model"),
        ("torch zip with code", "model.pt", _torch_zip_with_payload(marker), 422, "unsafe_model"),
        ("truncated .pt", "model.pt", torch_bytes[: len(torch_bytes) // 2], 422, "bad_model"),
        ("truncated zip", "model.skops", truncated_zip.getvalue()[:-40], 422, "bad_model"),
        ("path traversal", "../../etc/model.pt", torch_bytes, 400, "bad_input"),
        ("windows traversal", "..\\..\\model.pt", torch_bytes, 400, "bad_input"),
        ("dot-dot prefix", "..model.pt", torch_bytes, 400, "bad_input"),
    ]


def test_bad_uploads_get_a_clean_4xx_and_store_nothing(
    api, torch_model_bytes, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    for label, name, data, status, code in _bad_uploads(torch_model_bytes, marker):
        response = api.upload(data, name)
        assert response.status_code == status, (label, response.text)
        body = response.json()
        assert set(body) == {"error"}, label
        assert body["error"]["code"] == code, (label, body)
        assert body["error"]["message"], label
        assert "Traceback" not in response.text, label
        assert api.stored_keys() == [], label
    assert not marker.exists(), "a pickle payload ran"


def test_malformed_multipart_requests(api, torch_model_bytes) -> None:
    cases = [
        api.client.post("/v1/models", headers=ALICE, json={"file": "x"}),
        api.client.post("/v1/models", headers=ALICE, files={"other": ("m.pt", torch_model_bytes)}),
        api.client.post("/v1/models", headers=ALICE, data={"file": "not a file"}),
        api.client.post(
            "/v1/models",
            headers=ALICE,
            files=[("file", ("a.pt", torch_model_bytes)), ("file", ("b.pt", torch_model_bytes))],
        ),
        api.client.post(
            "/v1/models",
            headers={**ALICE, "Content-Type": "multipart/form-data; boundary=B"},
            content=TRUNCATED_FORM,
        ),
    ]
    for response in cases:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "bad_input"
    assert api.stored_keys() == []


def test_declared_oversize_body_is_refused_before_reading(api) -> None:
    response = api.client.post(
        "/v1/models",
        headers={
            **ALICE,
            "Content-Type": "multipart/form-data; boundary=B",
            "Content-Length": str(50 * 1024 * 1024),
        },
        content=b"--B--\r\n",
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


# --- bring your own torch model: .pt2 programs and bare state dicts with an arch ---------------

SMALL_MLP = {"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10}


def _bare_state_dict(arch: dict[str, object]) -> bytes:
    import torch

    from modules.storage.architectures import build_model

    buffer = io.BytesIO()
    torch.save(build_model(arch).state_dict(), buffer)
    return buffer.getvalue()


def _upload_with_arch(api, data: bytes, name: str, arch: str) -> object:
    return api.client.post(
        "/v1/models", headers=ALICE, files={"file": (name, data)}, data={"arch": arch}
    )


def test_upload_pt2_program(api) -> None:
    from tests.corpus.make_corpus import pt2_bytes

    data = pt2_bytes()
    response = api.upload(data, "resmlp.pt2")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["framework"], body["format"]) == ("torch", "torch-export")
    assert (body["in_features"], body["num_classes"]) == (64, 10)
    assert api.stored_keys() == [
        f"users/alice/models/{body['id']}/meta.json",
        f"users/alice/models/{body['id']}/model.pt2",
    ]


def test_upload_bare_state_dict_with_an_arch_field(api) -> None:
    from modules.storage.model_formats import load_model

    response = _upload_with_arch(api, _bare_state_dict(SMALL_MLP), "sd.pt", json.dumps(SMALL_MLP))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["in_features"], body["num_classes"]) == (64, 10)
    # Stored as the checkpoint it makes: it loads later with no arch given.
    stored = Path(str(api.settings.store_url)) / f"users/alice/models/{body['id']}/model.pt"
    assert load_model(stored.read_bytes()).meta["arch"]["name"] == "tree"
    assert body["size"] == stored.stat().st_size


def test_bad_state_dict_uploads_are_clear_4xx_and_store_nothing(api) -> None:
    bare = _bare_state_dict(SMALL_MLP)
    cases = [
        ("no arch", api.upload(bare, "sd.pt"), 422, "arch"),
        ("unknown arch", _upload_with_arch(api, bare, "sd.pt", "resnet19"), 422, "resnet19"),
        (
            "wrong arch",
            _upload_with_arch(api, bare, "sd.pt", "resnet18"),
            422,
            "'conv1.weight'",
        ),
        ("not an arch", _upload_with_arch(api, bare, "sd.pt", "x; rm -rf"), 400, "arch"),
        ("arch too long", _upload_with_arch(api, bare, "sd.pt", "a" * 5000), 400, "too long"),
    ]
    for label, response, status, needle in cases:
        assert response.status_code == status, (label, response.text)
        assert needle in response.json()["error"]["message"], (label, response.text)
    assert api.stored_keys() == []


def test_hostile_pt2_uploads_are_refused_and_run_nothing(api, tmp_path: Path) -> None:
    from tests.corpus.make_corpus import build_corpus

    marker = tmp_path / "PWNED"
    corpus = build_corpus(tmp_path / "corpus", marker)
    hostile = [s for s in corpus if s.name.startswith(("pt2_", "pt_bare"))]
    assert len(hostile) == 6
    for specimen in hostile:
        data = Path(str(specimen.path)).read_bytes()
        response = api.upload(data, str(specimen.upload_name))
        assert response.status_code == 422, (specimen.name, response.text)
        assert response.json()["error"]["code"] in ("unsafe_model", "bad_model"), specimen.name
        assert "Traceback" not in response.text
    assert not marker.exists(), "a .pt2 payload ran"
    assert api.stored_keys() == []


def test_mcaas_submit_uploads_a_bare_state_dict_with_arch(api, tmp_path: Path, monkeypatch) -> None:
    """`mcaas submit sd.pt --arch ...` sends the arch field; without it the API's 422 is exit 2."""
    import httpx
    from typer.testing import CliRunner

    from modules.cli import app

    def client_on_the_app(base_url: str, headers: dict[str, str], timeout: object) -> object:
        api.client.headers.update(headers)
        return contextlib.nullcontext(api.client)  # the fixture's client, already started

    monkeypatch.setattr(httpx, "Client", client_on_the_app)
    sd = tmp_path / "sd.pt"
    sd.write_bytes(_bare_state_dict(SMALL_MLP))
    args = ["submit", str(sd), "--preset", "measure", "--api-key", ALICE["X-API-Key"]]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "bare state_dict" in refused.output
    done = CliRunner().invoke(app, [*args, "--arch", json.dumps(SMALL_MLP)])
    assert done.exit_code == 0, done.output
    listing = api.client.get("/v1/models", headers=ALICE).json()
    assert listing["count"] == 1 and listing["data"][0]["num_classes"] == 10
    (job,) = api.client.get("/v1/jobs", headers=ALICE).json()["data"]
    assert api.wait_for(job["id"])["status"] == "COMPLETED"
