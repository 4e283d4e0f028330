"""Safe model load/save: round-trips per framework, and every unsafe or broken file refused."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnx
import pytest
import skops.io as sio
import torch
from onnx import TensorProto, helper
from sklearn.datasets import load_digits
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.feature_selection import (
    SelectFromModel,
    SelectKBest,
    VarianceThreshold,
    f_classif,
    mutual_info_classif,
)
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from torch import nn

from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError, ModelFormatError, UnsafeModelError
from modules.storage import model_formats
from modules.storage.architectures import build_model
from modules.storage.model_formats import (
    TRUSTED_SKLEARN_TYPES,
    load_model,
    load_model_file,
    save_model,
    sniff_format,
)

MLP = {"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10}
CNN = {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [8, 16], "num_classes": 10}
RESNET = {
    "name": "resnet",
    "in_channels": 1,
    "image_size": 8,
    "widths": [8, 16],
    "blocks": [1, 1],
    "num_classes": 10,
}


class _ShellPayload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _NotTrusted:
    """A class no allow-list knows."""

    def __init__(self) -> None:
        self.value = 1


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data, data.target


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(5, 64, generator=torch.Generator().manual_seed(0))


def _torch_bytes(obj: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _trained_like(arch: dict[str, Any]) -> nn.Module:
    model = build_model(arch)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return model.eval()


def _tiny_onnx(*, domain: str = "", op: str = "MatMul") -> onnx.ModelProto:
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], np.ones(8, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node(op, ["X", "W"], ["Y"], domain=domain)],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])],
        [weight],
    )
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets)


# --- torch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [MLP, CNN, RESNET], ids=lambda a: a["name"])
def test_torch_round_trip_gives_identical_outputs(arch: dict[str, Any], batch: torch.Tensor):
    model = _trained_like(arch)
    data = save_model(ModelArtifact("torch", model, {"arch": arch, "note": "kept"}))
    loaded = load_model(data, filename="model.pt")
    assert loaded.framework == "torch"
    assert torch.equal(loaded.obj(batch), model(batch))
    assert not loaded.obj.training
    assert loaded.meta["in_features"] == 64
    assert loaded.meta["num_classes"] == 10
    assert loaded.meta["note"] == "kept"
    assert loaded.meta["zoo_arch"] == arch
    assert loaded.meta["arch"]["name"] == "tree"


def test_torch_round_trip_of_a_compressed_model(batch: torch.Tensor):
    model = _trained_like(MLP)
    model[0] = nn.Sequential(nn.Linear(64, 4, bias=False), nn.Linear(4, 20))
    model[2] = nn.Linear(20, 10)
    data = save_model(ModelArtifact("torch", model.eval(), {"arch": MLP}))
    loaded = load_model(data)
    assert torch.equal(loaded.obj(batch), model(batch))
    assert loaded.meta["zoo_arch"] == MLP  # the original arch survives; the tree is the truth


def test_torch_half_precision_round_trip_keeps_the_dtype(batch: torch.Tensor):
    model = _trained_like(MLP).half()
    loaded = load_model(save_model(ModelArtifact("torch", model)))
    assert next(loaded.obj.parameters()).dtype == torch.float16
    assert torch.equal(loaded.obj(batch.half()), model(batch.half()))


def test_a_bare_user_checkpoint_with_a_zoo_arch_loads(batch: torch.Tensor):
    model = _trained_like(CNN)
    data = _torch_bytes({"arch": CNN, "state_dict": model.state_dict()})
    loaded = load_model(data, filename="mine.pth")
    assert torch.equal(loaded.obj(batch), model(batch))
    assert loaded.meta["zoo_arch"] == CNN


def test_a_state_dict_that_does_not_fit_the_arch_is_a_format_error():
    state = build_model({**MLP, "hidden": [16]}).state_dict()
    with pytest.raises(ModelFormatError, match="does not fit"):
        load_model(_torch_bytes({"arch": MLP, "state_dict": state}))


def test_a_bare_state_dict_without_arch_is_a_format_error():
    with pytest.raises(ModelFormatError, match="'arch' and 'state_dict'"):
        load_model(_torch_bytes(build_model(MLP).state_dict()), filename="weights.pt")


def test_a_checkpoint_with_an_unknown_arch_is_a_format_error():
    data = _torch_bytes({"arch": {"name": "vgg"}, "state_dict": {}})
    with pytest.raises(ModelFormatError, match="unknown arch 'vgg'"):
        load_model(data)


def test_a_full_pickled_module_needs_trust_pickle(batch: torch.Tensor):
    model = _trained_like(MLP)
    data = _torch_bytes(model)
    with pytest.raises(UnsafeModelError, match="not a weights-only checkpoint.*trust_pickle"):
        load_model(data, filename="full.pt")
    loaded = load_model(data, filename="full.pt", trust_pickle=True)
    assert loaded.meta["trusted_pickle"] is True
    assert loaded.meta["in_features"] == 64
    assert torch.equal(loaded.obj(batch), model(batch))
    resaved = load_model(save_model(loaded))  # now a safe weights-only checkpoint
    assert "trusted_pickle" not in resaved.meta
    assert torch.equal(resaved.obj(batch), model(batch))


def test_saving_a_module_outside_the_allow_list_names_it():
    class Custom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(BadInputError, match="Custom"):
        save_model(ModelArtifact("torch", nn.Sequential(nn.Linear(2, 2), Custom())))


# --- the shell payload, through every loader path ------------------------------------------------


def _payload_bytes(kind: str, marker: Path) -> bytes:
    payload = _ShellPayload(marker)
    if kind == "pickle":
        return pickle.dumps(payload)
    if kind == "pickle-protocol-0":
        return pickle.dumps(payload, protocol=0)
    if kind == "joblib":
        buffer = io.BytesIO()
        joblib.dump(payload, buffer)
        return buffer.getvalue()
    if kind == "torch-zip":
        return _torch_bytes(payload)
    if kind == "torch-zip-in-checkpoint":
        state = build_model(MLP).state_dict()
        return _torch_bytes({"arch": MLP, "state_dict": state, "meta": {"x": payload}})
    if kind == "legacy-torch":
        return _torch_bytes(payload, _use_new_zipfile_serialization=False)
    raise AssertionError(kind)


PAYLOAD_KINDS = [
    "pickle",
    "pickle-protocol-0",
    "joblib",
    "torch-zip",
    "torch-zip-in-checkpoint",
    "legacy-torch",
]


@pytest.mark.parametrize("trust_pickle", [False, True])
@pytest.mark.parametrize("filename", [None, "m.pt", "m.skops", "m.onnx", "m.pkl", "m.joblib"])
@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_a_shell_payload_is_refused_by_every_loader_path(
    tmp_path: Path, kind: str, filename: str | None, trust_pickle: bool
):
    marker = tmp_path / "pwned"
    data = _payload_bytes(kind, marker)
    with pytest.raises(UnsafeModelError):
        load_model(data, filename=filename, trust_pickle=trust_pickle)
    path = tmp_path / (filename or "upload")
    path.write_bytes(data)
    with pytest.raises(UnsafeModelError):
        load_model_file(path, trust_pickle=trust_pickle)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "pickle-protocol-0", "joblib", "legacy-torch"])
def test_sniff_format_refuses_raw_pickle_streams(tmp_path: Path, kind: str):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeModelError, match="raw pickle stream"):
        sniff_format(_payload_bytes(kind, marker), "m.pt")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch-zip", "torch-zip-in-checkpoint"])
def test_weights_only_loading_refuses_the_payload_even_if_the_scanner_misses_it(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(model_formats, "_scan_pickles", lambda data, *, trust_pickle: None)
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeModelError, match="not a weights-only checkpoint"):
        load_model(_payload_bytes(kind, marker), filename="m.pt")
    assert not marker.exists()


def test_a_scanner_failure_counts_as_a_rejection(monkeypatch: pytest.MonkeyPatch):
    import picklescan.scanner

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("scanner crashed")

    monkeypatch.setattr(picklescan.scanner, "scan_bytes", broken)
    data = save_model(ModelArtifact("torch", build_model(MLP)))
    with pytest.raises(UnsafeModelError, match="pickle scan failed"):
        load_model(data)


# --- scikit-learn --------------------------------------------------------------------------------


def _project_sklearn_models() -> dict[str, Any]:
    return {
        "knn": KNeighborsClassifier(3),
        "knn-kd-tree": KNeighborsClassifier(3, algorithm="kd_tree"),
        "knn-ball-tree-manhattan": KNeighborsClassifier(
            3, algorithm="ball_tree", metric="manhattan"
        ),
        "random-forest": RandomForestClassifier(5, random_state=0),
        "extra-trees": ExtraTreesClassifier(5, random_state=0),
        "decision-tree": DecisionTreeClassifier(random_state=0),
        "logistic-regression": LogisticRegression(max_iter=300),
        "pipeline-variance-knn": Pipeline(
            [("vt", VarianceThreshold()), ("knn", KNeighborsClassifier(3))]
        ),
        "pipeline-scaler-kbest-f": Pipeline(
            [
                ("scale", StandardScaler()),
                ("kbest", SelectKBest(f_classif, k=20)),
                ("lr", LogisticRegression(max_iter=300)),
            ]
        ),
        "pipeline-kbest-mi": Pipeline(
            [("kbest", SelectKBest(mutual_info_classif, k=20)), ("knn", KNeighborsClassifier(3))]
        ),
        "pipeline-select-from-forest": Pipeline(
            [
                ("sfm", SelectFromModel(ExtraTreesClassifier(5, random_state=0))),
                ("knn", KNeighborsClassifier(3)),
            ]
        ),
    }


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("name", list(_project_sklearn_models()))
def test_sklearn_round_trip_predicts_the_same(
    name: str, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
):
    x, y = digits
    model = _project_sklearn_models()[name].fit(x[:600], y[:600])
    data = save_model(ModelArtifact("sklearn", model))
    assert set(sio.get_untrusted_types(data=data)) <= TRUSTED_SKLEARN_TYPES
    path = tmp_path / "model.skops"
    path.write_bytes(data)
    loaded = load_model_file(path)
    assert loaded.framework == "sklearn"
    assert np.array_equal(loaded.obj.predict(x), model.predict(x))
    assert loaded.meta == {"in_features": 64, "num_classes": 10}


def test_a_skops_file_with_an_untrusted_class_is_refused_naming_it():
    data = sio.dumps({"model": _NotTrusted()})
    with pytest.raises(UnsafeModelError, match=r"_NotTrusted"):
        load_model(data, filename="m.skops")


def test_a_skops_file_referencing_eval_is_refused_naming_it():
    data = sio.dumps(SelectKBest(score_func=eval))
    with pytest.raises(UnsafeModelError, match=r"builtins\.eval"):
        load_model(data, filename="m.skops")


def test_a_joblib_sklearn_model_is_refused(digits: tuple[np.ndarray, np.ndarray]):
    x, y = digits
    buffer = io.BytesIO()
    joblib.dump(DecisionTreeClassifier(max_depth=2).fit(x, y), buffer)
    with pytest.raises(UnsafeModelError, match="never loaded"):
        load_model(buffer.getvalue(), filename="model.skops")


# --- ONNX ----------------------------------------------------------------------------------------


def test_onnx_round_trip_of_a_converted_logistic_regression(digits: tuple[np.ndarray, np.ndarray]):
    from skl2onnx import to_onnx

    x, y = digits
    lr = LogisticRegression(max_iter=100).fit(x[:300], y[:300])
    proto = to_onnx(lr, x[:1].astype(np.float32))
    data = save_model(ModelArtifact("onnx", proto))
    loaded = load_model(data, filename="model.onnx")
    assert loaded.framework == "onnx"
    assert loaded.obj.SerializeToString() == proto.SerializeToString()
    assert loaded.meta["in_features"] == 64


def test_onnx_round_trip_of_a_helper_graph():
    proto = _tiny_onnx()
    assert sniff_format(proto.SerializeToString(), "tiny.onnx") == "onnx"
    loaded = load_model(save_model(ModelArtifact("onnx", proto)))
    assert loaded.obj == proto
    assert loaded.meta == {"in_features": 4}


def test_onnx_with_an_external_data_initializer_is_refused():
    proto = _tiny_onnx()
    weight = proto.graph.initializer[0]
    weight.ClearField("float_data")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    with pytest.raises(UnsafeModelError, match=r"external data at '\.\./\.\./etc/passwd'"):
        load_model(proto.SerializeToString(), filename="m.onnx")


def test_onnx_with_a_custom_op_domain_is_refused():
    proto = _tiny_onnx(domain="evil.ops", op="RunShell")
    with pytest.raises(UnsafeModelError, match="evil.ops"):
        load_model(proto.SerializeToString(), filename="m.onnx")


def test_onnx_failing_the_checker_is_a_format_error():
    proto = _tiny_onnx(op="NoSuchOp")
    with pytest.raises(ModelFormatError, match=r"onnx\.checker"):
        load_model(proto.SerializeToString())


# --- zips, truncation, sniffing ------------------------------------------------------------------


def _zip_bytes(members: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(zipfile.ZipInfo(name), content, compress_type=compression)
    return buffer.getvalue()


def test_a_zip_member_climbing_out_with_dotdot_is_refused():
    data = _zip_bytes({"archive/data.pkl": pickle.dumps({}), "../evil.pkl": b"x"})
    with pytest.raises(UnsafeModelError, match=r"'\.\./evil\.pkl'"):
        load_model(data, filename="m.pt")


def test_an_absolute_zip_member_is_refused():
    with pytest.raises(UnsafeModelError, match="absolute"):
        load_model(_zip_bytes({"/etc/data.pkl": b"x"}))


def test_an_absurd_declared_uncompressed_size_is_refused():
    data = bytearray(save_model(ModelArtifact("torch", build_model(MLP))))
    patched = 0
    start = data.find(b"PK\x01\x02")
    while start != -1 and patched < 2:
        struct.pack_into("<I", data, start + 24, 0xFFFFFFF0)  # central directory file size
        patched += 1
        start = data.find(b"PK\x01\x02", start + 4)
    with pytest.raises(UnsafeModelError, match="zip bomb"):
        load_model(bytes(data), filename="m.pt")


def test_a_member_with_a_bomb_like_compression_ratio_is_refused():
    data = _zip_bytes(
        {"archive/data.pkl": b"\x00" * (8 * 1024 * 1024)}, compression=zipfile.ZIP_DEFLATED
    )
    with pytest.raises(UnsafeModelError, match="expands"):
        load_model(data)


def test_an_empty_file_is_a_format_error(tmp_path: Path):
    with pytest.raises(ModelFormatError, match="empty"):
        load_model(b"", filename="m.pt")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty"):
        load_model_file(tmp_path / "empty.onnx")


@pytest.mark.parametrize("framework", ["torch", "sklearn", "onnx"])
def test_a_truncated_file_is_a_format_error(framework: str, digits: tuple[np.ndarray, np.ndarray]):
    x, y = digits
    obj: Any = {
        "torch": build_model(MLP),
        "sklearn": KNeighborsClassifier(3).fit(x, y),
        "onnx": _tiny_onnx(),
    }[framework]
    artifact = ModelArtifact(framework, obj)  # type: ignore[arg-type]
    data = save_model(artifact)
    with pytest.raises(ModelFormatError):
        load_model(data[: len(data) // 2], filename="m" + artifact.suffix)


def test_random_bytes_are_a_format_error():
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ModelFormatError, match="unrecognised"):
        load_model(noise, filename="m.onnx")


@pytest.mark.parametrize(("framework", "wrong_name"), [("torch", "m.onnx"), ("onnx", "m.skops")])
def test_a_suffix_that_contradicts_the_content_is_a_format_error(framework: str, wrong_name: str):
    obj = build_model(MLP) if framework == "torch" else _tiny_onnx()
    data = save_model(ModelArtifact(framework, obj))  # type: ignore[arg-type]
    with pytest.raises(ModelFormatError, match="is named like"):
        load_model(data, filename=wrong_name)
    with pytest.raises(ModelFormatError, match="is named like"):
        sniff_format(data, wrong_name)


def test_an_unknown_suffix_is_a_format_error():
    with pytest.raises(ModelFormatError, match="unsupported model file suffix '.h5'"):
        sniff_format(_tiny_onnx().SerializeToString(), "model.h5")


def test_sniff_format_by_content(digits: tuple[np.ndarray, np.ndarray]):
    x, y = digits
    assert sniff_format(save_model(ModelArtifact("torch", build_model(MLP)))) == "torch"
    skops_bytes = save_model(ModelArtifact("sklearn", KNeighborsClassifier(1).fit(x, y)))
    assert sniff_format(skops_bytes, "model.skops") == "sklearn"
    assert sniff_format(_tiny_onnx().SerializeToString()) == "onnx"


def test_a_missing_file_is_a_format_error_naming_the_path(tmp_path: Path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelFormatError, match=str(missing)):
        load_model_file(missing)


def test_importing_model_formats_does_not_import_torch():
    code = "import sys, modules.storage.model_formats; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
