"""IDX (MNIST-format) datasets keep the images' shape; flat models still get flat rows."""

import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn

from modules.core.jobspec import parse_job_spec
from modules.errors import BadInputError
from modules.evaluation.measure import MeasureParams, measure
from modules.pipeline.local import LocalWorkspace
from modules.storage.datasets import load_dataset
from modules.storage.inputs import dataset_for_model, torch_input_specs
from tests.unit.byo_models import byo_artifact

FAST_TIMING = {"runs": 2, "warmup": 0, "max_time_s": 0.05}


def write_idx(path, arr):
    code = {np.uint8: 0x08, np.int8: 0x09}[arr.dtype.type]
    with gzip.open(path, "wb") as fh:
        fh.write(bytes([0, 0, code, arr.ndim]))
        fh.write(struct.pack(f">{arr.ndim}I", *arr.shape))
        fh.write(arr.tobytes())


def mnist_like(root, *, n_train=60, n_test=30, size=6, labels_test=None):
    """A learnable IDX set: the class (0..2) is which third of the image is bright."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 3).astype(np.uint8)
        x = rng.integers(0, 40, (n, size, size)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, :, 2 * label : 2 * label + 2] += 200
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        if prefix == "t10k" and labels_test is not None:
            y = labels_test
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return f"idx:{root}"


def test_idx_images_load_as_n_1_h_w_scaled_to_unit_range(tmp_path):
    ds = load_dataset(mnist_like(tmp_path / "a"))
    assert ds.X_train.shape == (60, 1, 6, 6) and ds.X_test.shape == (30, 1, 6, 6)
    assert ds.X_train.dtype == np.float32 and ds.X_train.min() >= 0 and ds.X_train.max() <= 1
    assert ds.image_shape == (1, 6, 6) and ds.n_features == 36
    assert ds.describe()["sample_shape"] == [1, 6, 6]
    flat = ds.flat()
    assert flat.X_train.shape == (60, 36) and flat.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(flat.X_test[3], ds.X_test[3].reshape(-1))


def test_a_model_gets_the_shape_it_declares(tmp_path, ctx_factory):
    ds = load_dataset(mnist_like(tmp_path / "b"))
    conv_inputs = [{"name": "x", "shape": [1, 6, 6], "dtype": "float32"}]
    flat_inputs = [{"name": "x", "shape": [36], "dtype": "float32"}]
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    flat = nn.Sequential(nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))
    as_conv = dataset_for_model(ds, torch_input_specs({"inputs": conv_inputs}))
    as_flat = dataset_for_model(ds, torch_input_specs({"inputs": flat_inputs}))
    assert as_conv.X_test.shape == (30, 1, 6, 6) and as_flat.X_test.shape == (30, 36)
    for model, inputs in ((conv, conv_inputs), (flat, flat_inputs)):
        out = measure(
            byo_artifact(model, inputs),
            ds,
            MeasureParams(batch_sizes=[8], **FAST_TIMING),
            ctx_factory(),
        )
        assert out.metrics["n_test"] == 30 and 0 <= out.metrics["accuracy"] <= 1
    with torch.no_grad():
        assert conv(torch.from_numpy(as_conv.X_test)).shape == (30, 3)


@pytest.mark.parametrize(
    ("model", "tail"),
    [
        ("mlp", [{"name": "prune_structured", "params": {"amount": 0.5, "finetune_epochs": 1}}]),
        ("cnn", []),
        ("logreg", [{"name": "onnx_export"}, {"name": "onnx_parity", "params": FAST_TIMING}]),
    ],
)
def test_zoo_and_sklearn_models_train_and_run_on_idx_images(tmp_path, model, tail):
    ref = mnist_like(tmp_path / "data")
    train = {"model": model, **({"max_iter": 200} if model == "logreg" else {"epochs": 20})}
    spec = parse_job_spec(
        {
            "job_id": f"idx-{model}",
            "dataset": ref,
            "steps": [
                {"name": "train", "params": train},
                {"name": "measure", "params": {"batch_sizes": [8], **FAST_TIMING}},
                *tail,
            ],
        }
    )
    result = LocalWorkspace(tmp_path / "ws").run(spec)
    assert result.status == "COMPLETED", result.reason
    trained = result.records[0]
    assert trained.metrics["test_accuracy"] > 0.9  # the bright stripe is easy to find
    assert trained.dataset["fingerprint"] == load_dataset(ref).fingerprint


def test_bad_idx_files_are_refused_naming_the_problem(tmp_path):
    with pytest.raises(BadInputError, match="t10k-images holds 30 samples, t10k-labels 5"):
        load_dataset(mnist_like(tmp_path / "c", labels_test=np.zeros(5, dtype=np.uint8)))
    root = tmp_path / "d"
    mnist_like(root)
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((30, 5, 6), dtype=np.uint8))
    with pytest.raises(BadInputError, match=r"train images are \[1, 6, 6\].*\[1, 5, 6\]"):
        load_dataset(f"idx:{root}")
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((30,), dtype=np.uint8))
    with pytest.raises(BadInputError, match=r"t10k-images has shape \[30\]"):
        load_dataset(f"idx:{root}")
