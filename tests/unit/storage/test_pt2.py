"""The safe .pt2 reader/writer: round trips, the agreed in-memory form, and hostile archives."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError, ModelFormatError, UnsafeModelError
from modules.storage.model_formats import load_model, save_model, sniff_format
from modules.storage.pt2 import check_expr, check_target, example_inputs
from tests.corpus.make_corpus import _torch_zip, payloads, pt2_bytes, pt2_edit


@pytest.fixture(scope="module")
def pt2() -> bytes:
    return pt2_bytes()


class TwoInputs(nn.Module):
    """Token ids plus a mask: an embedding bag, like a tiny text classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()
        pooled = (self.embed(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def test_a_pt2_loads_as_a_torch_artifact_in_the_agreed_form(pt2: bytes) -> None:
    assert sniff_format(pt2, "model.pt2") == "pt2"
    artifact = load_model(pt2, filename="model.pt2")
    assert artifact.framework == "torch"
    assert isinstance(artifact.obj, nn.Module)
    assert artifact.meta["format"] == "pt2"
    assert artifact.meta["inputs"] == [{"name": "x", "shape": [64], "dtype": "float32"}]
    assert (artifact.meta["in_features"], artifact.meta["num_classes"]) == (64, 10)
    assert artifact.suffix == ".pt2"
    # The batch dim stays dynamic; eval() works (every step calls it).
    artifact.obj.eval()
    assert artifact.obj(torch.randn(1, 64)).shape == (1, 10)
    assert artifact.obj(torch.randn(300, 64)).shape == (300, 10)


def test_pt2_round_trip_load_save_load_keeps_outputs_and_meta(pt2: bytes) -> None:
    first = load_model(pt2, filename="model.pt2")
    first.meta["note"] = "kept"
    blob = save_model(first)
    second = load_model(blob, filename="again.pt2")
    assert second.meta == first.meta
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(second.obj(x), first.obj(x), rtol=0, atol=0)
    assert second.suffix == ".pt2"
    # and once more, from the re-exported program
    third = load_model(save_model(second))
    torch.testing.assert_close(third.obj(x), first.obj(x), rtol=0, atol=0)


def test_a_plain_module_with_pt2_meta_is_exported_with_dynamic_dims() -> None:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    meta = {
        "format": "pt2",
        "inputs": [
            {"name": "ids", "shape": [None], "dtype": "int64"},
            {"name": "mask", "shape": [None], "dtype": "int64"},
        ],
    }
    loaded = load_model(save_model(ModelArtifact("torch", model, meta)), filename="text.pt2")
    assert loaded.meta["inputs"] == meta["inputs"]
    assert loaded.meta["num_classes"] == 3
    assert "in_features" not in loaded.meta  # two inputs: no single feature count
    ids = torch.randint(0, 100, (4, 11))
    mask = torch.ones(4, 11, dtype=torch.int64)
    torch.testing.assert_close(loaded.obj(ids, mask), model(ids, mask))


def test_example_inputs_follow_the_meta() -> None:
    meta = {
        "inputs": [
            {"name": "image", "shape": [3, 32, 32], "dtype": "float32"},
            {"name": "ids", "shape": [None], "dtype": "int64"},
        ]
    }
    image, ids = example_inputs(meta, 5)
    assert image.shape == (5, 3, 32, 32) and image.dtype == torch.float32
    assert ids.shape == (5, 8) and ids.dtype == torch.int64 and int(ids.abs().sum()) == 0
    torch.testing.assert_close(example_inputs(meta, 5)[0], image)  # seeded
    with pytest.raises(BadInputError, match="batch"):
        example_inputs(meta, 0)
    with pytest.raises(BadInputError, match="inputs"):
        example_inputs({"inputs": [{"name": "x", "shape": [3], "dtype": "object"}]}, 1)


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.aten.linear.default",
        "torch.ops.aten.add.Tensor",
        "torch.ops.prims.convert_element_type.default",
        "_operator.getitem",
        "_operator.mul",
    ],
)
def test_allow_listed_operators(target: str) -> None:
    check_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.evil_ns.backdoor.default",
        "torch.ops.higher_order.cond",
        "torch.ops.aten.from_file.default",
        "builtins.eval",
        "_operator.attrgetter",
        "#custom:op",
        "torch.load",
    ],
)
def test_other_operators_are_refused(target: str) -> None:
    with pytest.raises(UnsafeModelError, match="not allowed"):
        check_target(target)


@pytest.mark.parametrize(
    "expr",
    ["Symbol('s77', positive=True, integer=True)", "2*s0 + 1", "Max(1, s0)", "FloorDiv(s0, 2)"],
)
def test_shape_arithmetic_is_accepted(expr: str) -> None:
    check_expr(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "s0.__class__",
        "eval('1')",
        "Symbol('x; import os', integer=True)",
        "9**999999999",
        "s0 if s0 else s1",
    ],
)
def test_shape_expressions_that_are_not_arithmetic_are_refused(expr: str) -> None:
    with pytest.raises(UnsafeModelError, match="shape expression"):
        check_expr(expr)


def _corpus_pt2(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    marker = tmp_path / "PWNED"
    base = pt2_bytes()
    live = payloads(marker)

    def mark_pickled(config: dict[str, Any]) -> dict[str, Any]:
        entry = next(e for e in config["config"].values() if e["path_name"] == "weight_0")
        entry["use_pickle"] = True
        return config

    def sympy_exec(program: dict[str, Any]) -> dict[str, Any]:
        size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = f"__import__('os').system('touch {marker}')"
        return program

    specimens = {
        "pickled weight": pt2_edit(
            base,
            replace={"data/weights/weight_0": _torch_zip(live["os_system"])},
            weights=mark_pickled,
        ),
        "sample inputs": pt2_edit(
            base, replace={"data/sample_inputs/model.pt": _torch_zip(live["exec"])}
        ),
        "sympy expression": pt2_edit(base, program=sympy_exec),
    }
    return marker, specimens


def test_code_running_pt2s_are_live_under_torch_export_load(tmp_path: Path) -> None:
    """Each crafted archive runs its payload under torch.export.load: the refusals matter."""
    marker, specimens = _corpus_pt2(tmp_path)
    for label, data in specimens.items():
        with pytest.raises(Exception):  # noqa: B017  (torch fails after running the payload)
            torch.export.load(io.BytesIO(data))
        assert marker.exists(), f"{label}: torch.export.load did not run it"
        marker.unlink()


def test_code_running_pt2s_are_refused_and_run_nothing(tmp_path: Path) -> None:
    marker, specimens = _corpus_pt2(tmp_path)
    for label, data in specimens.items():
        with pytest.raises(UnsafeModelError) as caught:
            load_model(data, filename="model.pt2")
        assert "Traceback" not in str(caught.value), label
        assert not marker.exists(), f"{label}: the payload ran"


def _weights(config_edit: Any, replace: dict[str, bytes] | None = None) -> bytes:
    return pt2_edit(pt2_bytes(), replace=replace, weights=config_edit)


def _first_weight(config: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in config["config"].values() if e["path_name"] == "weight_0")


def test_a_declared_huge_tensor_is_refused_before_anything_is_read() -> None:
    def huge(config: dict[str, Any]) -> dict[str, Any]:
        meta = _first_weight(config)["tensor_meta"]
        meta["sizes"] = [{"as_int": 65536}, {"as_int": 65536}, {"as_int": 16}]
        meta["strides"] = [{"as_int": 1048576}, {"as_int": 16}, {"as_int": 1}]
        return config

    with pytest.raises(UnsafeModelError, match="over 200,000,000 elements"):
        load_model(_weights(huge, {"data/weights/weight_0": b""}))


def test_a_tensor_larger_than_its_payload_is_refused() -> None:
    def bigger(config: dict[str, Any]) -> dict[str, Any]:
        meta = _first_weight(config)["tensor_meta"]
        meta["sizes"] = [{"as_int": 64}, {"as_int": 64}]
        meta["strides"] = [{"as_int": 64}, {"as_int": 1}]
        return config

    with pytest.raises(UnsafeModelError, match="payload holds"):
        load_model(_weights(bigger))


def test_archive_structure_is_checked(pt2: bytes) -> None:
    with pytest.raises(UnsafeModelError, match="unexpected member"):
        load_model(pt2_edit(pt2, replace={"data/weights/evil.so": b"\x7fELF"}))
    with pytest.raises(ModelFormatError, match="AOTInductor"):
        load_model(pt2_edit(pt2, replace={"data/aotinductor/model/model.so": b"\x7fELF"}))
    with pytest.raises(ModelFormatError, match="only one program"):
        load_model(pt2_edit(pt2, replace={"models/second.json": b"{}"}))
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(pt2_edit(pt2, replace={"models/model.json": b"{not json"}))
    two_tops = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(pt2)) as source, zipfile.ZipFile(two_tops, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
        target.writestr("other/archive_format", b"pt2")
    with pytest.raises(ModelFormatError, match="one top folder"):
        load_model(two_tops.getvalue())


def test_a_script_object_in_the_program_is_refused(pt2: bytes) -> None:
    def with_custom_obj(program: dict[str, Any]) -> dict[str, Any]:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["inputs"][0]["arg"] = {"as_custom_obj": {"name": "obj", "class_fqn": "evil.Cls"}}
        return program

    with pytest.raises(UnsafeModelError, match="script object"):
        load_model(pt2_edit(pt2, program=with_custom_obj))


def test_an_arch_is_refused_beside_a_pt2(pt2: bytes) -> None:
    with pytest.raises(BadInputError, match="only given with a torch state_dict"):
        load_model(pt2, filename="model.pt2", arch="resnet18")


def test_a_pt2_named_pt_is_a_suffix_mismatch(pt2: bytes) -> None:
    with pytest.raises(ModelFormatError, match=r"torch.export program \(.pt2\)"):
        load_model(pt2, filename="model.pt")


def test_stored_meta_never_overrides_what_the_program_says(pt2: bytes) -> None:
    claims = json.dumps({"inputs": [{"name": "evil", "shape": [1], "dtype": "int8"}], "x": 1})
    loaded = load_model(pt2_edit(pt2, replace={"extra/mcaas_meta.json": claims.encode()}))
    assert loaded.meta["inputs"] == [{"name": "x", "shape": [64], "dtype": "float32"}]
    assert loaded.meta["x"] == 1
