"""measure on ONNX graphs and torch models of any input signature; mismatches named."""

import io
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from modules.core.artifact import ModelArtifact
from modules.errors import IncompatibleError
from modules.evaluation.measure import MeasureParams, measure
from modules.storage.artifacts import LocalStore
from modules.storage.datasets import load_dataset
from modules.storage.keys import inputs_key
from tests.unit.byo_models import (
    IMAGE_INPUTS,
    TOKEN_INPUTS,
    SmallResNet,
    ToyTransformer,
    example_inputs,
    token_dataset_npz,
)

FAST = {"runs": 3, "warmup": 1, "max_time_s": 0.05, "batch_sizes": [1, 8]}


def onnx_of(module, inputs, path):
    """A torch.onnx export with a dynamic batch and dynamic None dims, as a user makes one."""
    ex = example_inputs(inputs)
    axes = {
        spec["name"]: {0: "batch"}
        | {i + 1: f"d{i}" for i, d in enumerate(spec["shape"]) if d is None}
        for spec in inputs
    }
    torch.onnx.export(
        module.eval(),
        tuple(torch.from_numpy(v) for v in ex.values()),
        path,
        input_names=list(ex),
        output_names=["logits"],
        dynamic_axes=axes,
        dynamo=False,
        opset_version=17,
    )
    return path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo_onnx")
    torch.manual_seed(0)
    return {
        "image": onnx_of(SmallResNet(), IMAGE_INPUTS, root / "image.onnx"),
        "tokens": onnx_of(ToyTransformer(num_classes=4), TOKEN_INPUTS, root / "tokens.onnx"),
    }


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokens.npz"
    token_dataset_npz(path)
    return load_dataset(str(path))


def artifact(path):
    return ModelArtifact("onnx", onnx.load(path), {"source_framework": "torch"})


def test_a_4d_image_graph_is_measured_on_an_image_dataset(onnx_files, ctx_factory):
    data = load_dataset("digits32")
    out = measure(artifact(onnx_files["image"]), data, MeasureParams(**FAST), ctx_factory())
    assert out.metrics["n_test"] == 450 and 0 <= out.metrics["accuracy"] <= 1
    assert out.metrics["memory"]["b8"]["activation_bytes"] >= 8 * 3 * 32 * 32 * 4


def test_a_two_input_graph_is_measured_on_a_named_input_dataset(onnx_files, tokens, ctx_factory):
    out = measure(artifact(onnx_files["tokens"]), tokens, MeasureParams(**FAST), ctx_factory())
    assert out.metrics["n_test"] == len(tokens.y_test)
    assert out.metrics["latency_ms"]["b8"]["batch_size"] == 8


def test_a_two_input_graph_is_measured_on_an_inputs_file(onnx_files, ctx_factory, tmp_path):
    ctx = ctx_factory()
    ctx.read_bytes = stored(tmp_path, example_inputs(TOKEN_INPUTS, n=5)).get_bytes
    params = MeasureParams(inputs="rows", **FAST)
    out = measure(artifact(onnx_files["tokens"]), load_dataset("digits"), params, ctx)
    assert out.metrics["accuracy"] is None and out.metrics["n_inputs_rows"] == 5
    assert out.metrics["inputs"] == "rows"
    assert out.metrics["latency_ms"]["b1"]["median"] > 0


@pytest.mark.parametrize(
    ("which", "dataset", "message"),
    [
        (
            "image",
            "digits",
            r"input x \(float32 \[batch, 3, 32, 32\]\) cannot be fed .* \[450, 64\]",
        ),
        ("tokens", "digits", r"takes 2 inputs \(input_ids \(int64 \[batch, d0\]\)"),
        ("image", "digits32-as-tokens", "model input 'x' is missing"),
    ],
)
def test_a_dataset_that_does_not_fit_is_a_clear_error(
    which, dataset, message, onnx_files, tokens, ctx_factory
):
    data = tokens if dataset == "digits32-as-tokens" else load_dataset(dataset)
    with pytest.raises(IncompatibleError, match=message):
        measure(artifact(onnx_files[which]), data, MeasureParams(**FAST), ctx_factory())


def stored(tmp_path, rows):
    store = LocalStore(tmp_path / "store")
    buf = io.BytesIO()
    np.savez(buf, **rows)
    store.put_bytes(inputs_key("tester", "rows"), buf.getvalue())
    return store


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"input_ids": np.full((3, 12), 0.5, np.float32)}, "'attention_mask' is missing"),
        (
            {"input_ids": np.full((3, 12), 0.5), "attention_mask": np.ones((3, 12), np.int64)},
            "input 'input_ids': the model expects int64, .* has float64",
        ),
        (
            {"input_ids": np.ones((3, 12), np.int64), "attention_mask": np.ones((3, 9), np.int64)},
            "'attention_mask': dim 1 \\('d0'\\) is 9 but input 'input_ids' has 'd0' = 12",
        ),
    ],
)
def test_an_inputs_file_that_does_not_fit_names_the_input(
    onnx_files, ctx_factory, tmp_path, rows, message
):
    ctx = ctx_factory()
    ctx.read_bytes = stored(tmp_path, rows).get_bytes
    params = MeasureParams(inputs="rows", **FAST)
    with pytest.raises(IncompatibleError, match=message):
        measure(artifact(onnx_files["tokens"]), load_dataset("digits"), params, ctx)


def test_the_measure_script_exits_2_naming_the_mismatched_input(onnx_files, tmp_path):
    path = tmp_path / "rows.npz"
    np.savez(path, input_ids=np.full((3, 12), 0.5), attention_mask=np.ones((3, 12), np.int64))
    cmd = [
        sys.executable,
        "-m",
        "modules.compression.measure_inference_time",
        "--input-model",
        str(onnx_files["tokens"]),
        "--inputs",
        str(path),
        "--runs",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search("input 'input_ids': the model expects int64", done.stderr), done.stderr


@pytest.mark.slow
def test_the_measure_script_times_an_inputs_file(onnx_files, tmp_path):
    path = tmp_path / "rows.npz"
    np.savez(path, **example_inputs(TOKEN_INPUTS, n=4))
    cmd = [
        sys.executable,
        "-m",
        "modules.compression.measure_inference_time",
        "--input-model",
        str(onnx_files["tokens"]),
        "--inputs",
        str(path),
        "--runs",
        "2",
        "--batch-sizes",
        "1,4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["n_inputs_rows"] == 4 and set(metrics["latency_ms"]) == {"b1", "b4"}
