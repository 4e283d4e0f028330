"""Bring-your-own ONNX over the API: inputs files, the job pre-check, and the 4xx refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from onnx import TensorProto, helper

ALICE = {"X-API-Key": "alice-key-0001"}
BOB = {"X-API-Key": "bob-key-00002"}
VOCAB = 40


@pytest.fixture(scope="session")
def encoder_onnx() -> bytes:
    from tests.text_encoder import text_encoder, text_encoder_onnx

    model = text_encoder(vocab_size=VOCAB, dim=16, heads=2, layers=1, ff_dim=32, max_len=12)
    return text_encoder_onnx(model)


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def token_file(rows: int = 16, seq: int = 10) -> bytes:
    from tests.text_encoder import text_encoder_inputs

    return npz(**text_encoder_inputs(rows=rows, seq_len=seq, vocab_size=VOCAB))


def upload_inputs(api, data: bytes, name: str = "inputs.npz", headers=None):
    files = {"file": (name, data)}
    return api.client.post("/v1/inputs", headers=headers or ALICE, files=files)


def quantize_job(model_id: str, **params) -> dict:
    steps = [{"name": "onnx_quantize", "params": {"search": True, "latency_runs": 2, **params}}]
    return {"model_id": model_id, "steps": steps}


def test_an_inputs_file_is_stored_under_the_user_and_described(api) -> None:
    response = upload_inputs(api, token_file(), "tokens.npz")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["rows"] == 16 and body["filename"] == "tokens.npz"
    assert body["arrays"] == [
        {"name": "input_ids", "dtype": "int64", "shape": [16, 10]},
        {"name": "attention_mask", "dtype": "int64", "shape": [16, 10]},
    ]
    assert api.stored_keys() == [
        f"users/alice/inputs/{body['id']}/inputs.npz",
        f"users/alice/inputs/{body['id']}/meta.json",
    ]
    assert api.client.get(f"/v1/inputs/{body['id']}", headers=ALICE).json() == body
    assert api.client.get("/v1/inputs", headers=ALICE).json() == {"data": [body], "count": 1}
    assert api.client.get(f"/v1/inputs/{body['id']}", headers=BOB).status_code == 404


@pytest.mark.parametrize(
    ("name", "data", "status", "needle"),
    [
        (
            "inputs.npz",
            npz(ids=np.ones((2, 3)), notes=np.array([{"x": 1}, None], dtype=object)),
            400,
            "array 'notes' holds Python objects",
        ),
        ("inputs.npz", b"\x80\x04K\x01.", 400, "not a .npz (zip) file"),
        ("inputs.pkl", npz(x=np.ones(3)), 400, "unsupported file extension '.pkl'"),
        ("inputs.npz", npz(x=np.array(["a", "b"])), 400, "has dtype <U1"),
    ],
    ids=["object-array", "pickle-bytes", "pickle-suffix", "strings"],
)
def test_bad_inputs_files_get_a_4xx_and_store_nothing(api, name, data, status, needle) -> None:
    response = upload_inputs(api, data, name)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert api.stored_keys() == []


@pytest.fixture(scope="module")
def hostile_npz(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes, str]]:
    from tests.corpus.make_corpus import hostile_npz_files

    return hostile_npz_files(tmp_path_factory.mktemp("npz") / "MARKER")


@pytest.mark.parametrize(
    "name",
    [
        "npz_8_pib.npz",
        "npz_truncated_header.npz",
        "npz_unterminated_header.npz",
        "npz_code_in_header.npz",
        "npz_truncated_data.npz",
        "npz_negative_shape.npz",
        "npz_object_header.npz",
        "npz_deflate_bomb.npz",
        "npz_deflate_bomb_lying.npz",
    ],
)
def test_malformed_npz_files_are_400_naming_the_problem(api, hostile_npz, name) -> None:
    _, data, refusal = hostile_npz[name]
    response = upload_inputs(api, data, name)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_input" and refusal in error["message"], error
    if name != "npz_object_header.npz":
        assert "Python objects" not in error["message"]
    assert api.stored_keys() == []


def test_an_oversized_inputs_file_is_413(api) -> None:
    response = upload_inputs(api, b"PK\x03\x04" + b"\0" * (1024 * 1024 + 1))
    assert response.status_code == 413 and api.stored_keys() == []


def _graph(*, external: bool = False, domain: str = "") -> bytes:
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], np.ones(8, dtype=np.float32))
    if external:
        weight.data_location = TensorProto.EXTERNAL
        entry = weight.external_data.add()
        entry.key, entry.value = "location", "/etc/passwd"
        weight.ClearField("float_data")
    node = helper.make_node("Custom" if domain else "MatMul", ["X", "W"], ["Y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])],
        [weight],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_graph(external=True), "refers to external data at '/etc/passwd'"),
        (_graph(domain="evil.ops"), "custom operator domain(s) ['evil.ops']"),
    ],
    ids=["external-data", "custom-domain"],
)
def test_unsafe_onnx_uploads_are_422(api, data, needle) -> None:
    response = api.upload(data, "model.onnx")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "unsafe_model"
    assert needle in response.json()["error"]["message"]
    assert api.stored_keys() == []


@pytest.mark.parametrize(
    "name", ["onnx_constant_of_shape.onnx", "onnx_loop_2_62.onnx", "onnx_expand_from_data.onnx"]
)
def test_onnx_uploads_that_would_allocate_or_loop_without_bound_are_422(api, name) -> None:
    from tests.corpus.make_corpus import hostile_onnx_files

    _, data, refusal = hostile_onnx_files()[name]
    response = api.upload(data, "model.onnx")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsafe_model" and refusal in error["message"], error
    assert api.stored_keys() == []


def test_an_onnx_upload_lists_its_named_inputs(api, encoder_onnx) -> None:
    body = api.upload(encoder_onnx, "encoder.onnx").json()
    assert body["framework"] == "onnx" and body["in_features"] is None
    assert body["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
    ]
    assert body["outputs"] == [{"name": "embedding", "dtype": "float32", "shape": ["batch", 16]}]


def _no_job_ran(api) -> None:
    assert api.client.get("/v1/jobs", headers=ALICE).json()["count"] == 0
    assert not [k for k in api.stored_keys() if "/models/" not in k and "/inputs/" not in k]


def test_a_byo_job_without_an_inputs_file_is_400_before_anything_runs(api, encoder_onnx) -> None:
    model = api.upload(encoder_onnx, "encoder.onnx").json()
    response = api.submit(quantize_job(model["id"]))
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "input_ids (int64 [batch, seq])" in message and "POST /v1/inputs" in message
    assert "steps[0].params.inputs" in message
    _no_job_ran(api)


def test_a_byo_job_with_inputs_that_do_not_fit_is_422_naming_the_input(api, encoder_onnx) -> None:
    model = api.upload(encoder_onnx, "encoder.onnx").json()
    ids = np.ones((4, 10), np.int64)
    wrong_name = upload_inputs(api, npz(input_ids=ids, mask=ids)).json()
    response = api.submit(quantize_job(model["id"], inputs=wrong_name["id"]))
    assert response.status_code == 422, response.text
    assert "model input 'attention_mask' is missing" in response.json()["error"]["message"]
    wrong_seq = upload_inputs(api, npz(input_ids=ids, attention_mask=ids[:, :7])).json()
    response = api.submit(quantize_job(model["id"], inputs=wrong_seq["id"]))
    assert response.status_code == 422
    assert "input 'attention_mask': dim 1 ('seq') is 7" in response.json()["error"]["message"]
    _no_job_ran(api)


def test_an_unknown_or_foreign_inputs_id_is_404(api, encoder_onnx) -> None:
    model = api.upload(encoder_onnx, "encoder.onnx").json()
    bobs = upload_inputs(api, token_file(), headers=BOB).json()
    for inputs_id in ("nope", bobs["id"]):
        response = api.submit(quantize_job(model["id"], inputs=inputs_id))
        assert response.status_code == 404, response.text
    _no_job_ran(api)


def test_a_byo_encoder_job_searches_gates_and_reports(api, encoder_onnx) -> None:
    model = api.upload(encoder_onnx, "encoder.onnx").json()
    inputs = upload_inputs(api, token_file()).json()
    body = {
        "model_id": model["id"],
        "steps": [
            {
                "name": "onnx_quantize",
                "params": {"search": True, "inputs": inputs["id"], "latency_runs": 2},
            },
            {"name": "onnx_parity", "params": {"inputs": inputs["id"], "runs": 2, "warmup": 0}},
            {"name": "report", "params": {"plots": False}},
        ],
    }
    created = api.submit(body)
    assert created.status_code == 202, created.text
    job = api.wait_for(created.json()["id"])
    assert job["status"] == "COMPLETED", job["reason"]
    search, parity = job["records"][0], job["records"][1]
    assert search["metrics"]["kind"] == "embedding" and search["metrics"]["trials"]
    assert parity["metrics"]["min_cosine"] >= 0.99
    assert parity["metrics"]["worst_output"] == "embedding"
    assert "deployment_report.json" in parity["files"]
