"""Build the hostile-input corpus: files that must be refused, never executed or expanded.

Why generated, not committed: every code-running payload embeds the absolute path of the
marker file it would create, and that path lies in the test's own tmp dir. Generation
takes a few seconds and writes about 14 MB there, nearly all of it the 6 MiB over-the-cap
upload and the huge job specs; the zip bomb is 130 KB that *declares* 5 GiB (the expanded
form is never written, only streamed through zlib), and the 513 MiB file is sparse.

`python tests/corpus/make_corpus.py DIR [--marker PATH]` writes the corpus to DIR and
prints its index as JSON; the tests call `build_corpus(dest, marker)` from a fixture.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["model", "dataset", "jobspec", "filename"]

# 128 MiB of zeros deflates to ~130 KB; 40 central-directory entries point at that one
# member, so the archive declares 5 GiB while holding 130 KB.
BOMB_MEMBER_BYTES = 128 * 1024 * 1024
BOMB_ENTRIES = 40
OVERSIZE_UPLOAD_BYTES = 6 * 1024 * 1024  # over the 5 MB cap the hostile stack runs with
# The loaders' own cap (model_formats.MAX_MODEL_BYTES is 512 MiB): a sparse file, no disk.
OVERSIZE_FILE_BYTES = 513 * 1024 * 1024


@dataclass
class Specimen:
    """One hostile input and how to send it."""

    name: str
    kind: Kind
    what: str
    path: str | None = None  # the file on disk (model, dataset, job spec)
    upload_name: str | None = None  # the multipart file name it is uploaded under
    body: Any = None  # JSON body for POST /v1/jobs (jobspec kind)
    cli: bool = True  # also tried against the CLI loaders
    tags: list[str] = field(default_factory=list)


class _Reduce:
    """An object whose unpickling calls `func(*args)`: the classic pickle RCE."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def payloads(marker: Path) -> dict[str, _Reduce]:
    """Each way a pickle can run code; each would create `marker`."""
    quoted = str(marker).replace("'", "")
    write = f"open('{quoted}', 'w').write('pwned')"
    return {
        "os_system": _Reduce(os.system, (f"touch '{quoted}'",)),
        "subprocess": _Reduce(subprocess.call, (["touch", str(marker)],)),
        "eval": _Reduce(eval, (write,)),
        "exec": _Reduce(exec, (write,)),
    }


def checkpoint_bytes() -> bytes:
    """A real, valid torch checkpoint of a tiny MLP (the base of the truncated file)."""
    from modules.core.artifact import ModelArtifact
    from modules.storage.model_formats import save_model
    from modules.storage.architectures import build_model

    model = build_model({"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10})
    return save_model(ModelArtifact("torch", model, {}))


def _torch_zip(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pt2_bytes() -> bytes:
    """A real, valid torch.export program (.pt2) of a tiny residual MLP with a dynamic batch."""
    import torch
    from torch import nn

    class ResidualMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, 32)
            self.norm = nn.LayerNorm(32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(self.fc1(x))
            return self.fc2(self.norm(hidden) + hidden)

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        ResidualMLP().eval(), (torch.randn(4, 64),), dynamic_shapes=({0: batch},)
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def pt2_edit(
    base: bytes,
    *,
    replace: dict[str, bytes] | None = None,
    program: Any = None,
    weights: Any = None,
) -> bytes:
    """`base` with members replaced (names under 'archive/'), its program JSON or weights
    config passed through `program(dict)` / `weights(dict)`; everything else kept as is."""
    replace = dict(replace or {})
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            name = info.filename.split("/", 1)[1]
            content = replace.pop(name, None)
            if content is None:
                content = source.read(info.filename)
                if name == "models/model.json" and program is not None:
                    content = json.dumps(program(json.loads(content))).encode()
                if name == "data/weights/model_weights_config.json" and weights is not None:
                    content = json.dumps(weights(json.loads(content))).encode()
            target.writestr(info.filename, content)
        for name, content in replace.items():
            target.writestr(f"archive/{name}", content)
    return out.getvalue()


def _pt2_pickled_weight(base: bytes, payload: Any) -> bytes:
    """weight_0 marked use_pickle, its payload a torch.save zip whose unpickling runs code."""

    def mark(config: dict[str, Any]) -> dict[str, Any]:
        entry = next(e for e in config["config"].values() if e["path_name"] == "weight_0")
        entry["use_pickle"] = True
        return config

    return pt2_edit(base, replace={"data/weights/weight_0": _torch_zip(payload)}, weights=mark)


def _pt2_custom_op(program: dict[str, Any]) -> dict[str, Any]:
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.evil_ns.backdoor.default"
    return program


def _pt2_huge_tensor(config: dict[str, Any]) -> dict[str, Any]:
    # 65536 x 65536 x 16 float32 = 256 GiB declared; torch's own loader would torch.zeros it
    # for an empty payload.
    entry = next(e for e in config["config"].values() if e["path_name"] == "weight_0")
    entry["tensor_meta"]["sizes"] = [{"as_int": 65536}, {"as_int": 65536}, {"as_int": 16}]
    entry["tensor_meta"]["strides"] = [{"as_int": 1048576}, {"as_int": 16}, {"as_int": 1}]
    return config


def _pt2_sympy_exec(marker: Path) -> Any:
    quoted = str(marker).replace("'", "")

    def edit(program: dict[str, Any]) -> dict[str, Any]:
        values = program["graph_module"]["graph"]["tensor_values"]
        size = values["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = f"__import__('os').system('touch {quoted}')"
        return program

    return edit


def _deflated_zeros(n_bytes: int) -> tuple[bytes, int]:
    """Raw deflate of n zero bytes and their CRC-32, streamed in 8 MiB chunks."""
    import zlib

    chunk = bytes(8 * 1024 * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts, crc, left = [], 0, n_bytes
    while left:
        piece = chunk[: min(left, len(chunk))]
        parts.append(compressor.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def zip_bomb(*, member_bytes: int = BOMB_MEMBER_BYTES, entries: int = BOMB_ENTRIES) -> bytes:
    """An overlapping-entry zip bomb: `entries` directory entries share one deflated member.

    Laid out like a torch checkpoint (`archive/data.pkl`, ...) so only the zip checks,
    not the format sniffing, stand between it and an extraction.
    """
    data, crc = _deflated_zeros(member_bytes)
    names = [f"archive/data{i:02d}.pkl".encode() for i in range(entries)]
    names[0] = b"archive/data.pkl"
    # Zip64 local header (sizes in the extra field) so member sizes over 4 GiB would fit too.
    extra = struct.pack("<HHQQ", 0x0001, 16, member_bytes, len(data))
    local = (
        struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45,
            0,
            8,
            0,
            0,
            crc,
            0xFFFFFFFF,
            0xFFFFFFFF,
            len(names[0]),
            len(extra),
        )
        + names[0]
        + extra
    )
    central = b""
    for name in names:
        cextra = struct.pack("<HHQQQ", 0x0001, 24, member_bytes, len(data), 0)
        central += (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                45,
                45,
                0,
                8,
                0,
                0,
                crc,
                0xFFFFFFFF,
                0xFFFFFFFF,
                len(name),
                len(cextra),
                0,
                0,
                0,
                0,
                0xFFFFFFFF,
            )
            + name
            + cextra
        )
    cd_offset = len(local) + len(data)
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(names), len(names), len(central), cd_offset, 0
    )
    return local + data + central + end


def _zip_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _skops_with_reduce(module: str, name: str, args: list[str]) -> bytes:
    """A skops file whose DecisionTree's `tree_` is rebuilt by calling `module.name(*args)`."""
    import skops.io as sio
    from sklearn.tree import DecisionTreeClassifier

    x = [[0.0, 1.0], [1.0, 0.0], [0.0, 0.5], [1.0, 0.2]]
    honest = sio.dumps(DecisionTreeClassifier(max_depth=1).fit(x, [0, 1, 0, 1]))
    with zipfile.ZipFile(io.BytesIO(honest)) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    schema = json.loads(members["schema.json"])
    # Keep the honest Tree node's shape; only the callable and its arguments change.
    node = schema["content"]["content"]["tree_"]
    node["__class__"], node["__module__"] = name, module
    node["__reduce__"]["args"]["content"] = [
        {
            "__class__": "str",
            "__module__": "builtins",
            "__loader__": "JsonNode",
            "content": json.dumps(arg),
            "is_json": True,
            "__id__": 900 + i,
        }
        for i, arg in enumerate(args)
    ]
    members["schema.json"] = json.dumps(schema).encode()
    return _zip_with(members)


def _onnx_external_data() -> bytes:
    from onnx import TensorProto, helper

    weight = TensorProto()
    weight.name = "W"
    weight.data_type = TensorProto.FLOAT
    weight.dims.extend([64, 10])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "2560")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "exfiltrate",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 10])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def _onnx_custom_op() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("RunShell", ["X"], ["Y"], domain="evil.custom")],
        "custom",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil.custom", 1)],
    )
    return bytes(model.SerializeToString())


def _npz_object_arrays(marker: Path) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    evil = np.array([payloads(marker)["os_system"]], dtype=object)
    y = np.array([0], dtype=np.int64)
    np.savez(buffer, X_train=evil, y_train=y, X_test=evil, y_test=y)
    return buffer.getvalue()


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _job_specs() -> dict[str, tuple[str, Any]]:
    """JSON job bodies (as text, so deep nesting is not limited by our own json module)."""
    measure = {"name": "measure", "params": {}}
    return {
        "job_extra_top_field": (
            "an unknown top-level field (user_id smuggling)",
            json.dumps({"steps": [measure], "user_id": "bob"}),
        ),
        "job_extra_step_field": (
            "an unknown field inside a step",
            json.dumps({"steps": [{**measure, "shell": "rm -rf /"}]}),
        ),
        "job_extra_param": (
            "an unknown step param",
            json.dumps({"steps": [{"name": "measure", "params": {"exec": "id"}}]}),
        ),
        "job_huge_step_list": (
            "100,000 steps",
            json.dumps({"steps": [measure] * 100_000}),
        ),
        "job_huge_param_list": (
            "a 1,000,000-element param list",
            json.dumps(
                {"steps": [{"name": "measure", "params": {"batch_sizes": [1] * 1_000_000}}]}
            ),
        ),
        "job_deep_nesting": (
            "a profile nested 100,000 levels deep",
            '{"steps": [{"name": "measure"}], "profile": ' + _nested(100_000) + "}",
        ),
        "job_deep_nesting_params": (
            "step params nested 5,000 levels deep",
            '{"steps": [{"name": "measure", "params": ' + _nested(5_000) + "}]}",
        ),
        "job_dataset_path": (
            "a dataset that is a server path",
            json.dumps({"steps": [measure], "dataset": "/etc/passwd"}),
        ),
    }


def build_corpus(dest: Path, marker: Path) -> list[Specimen]:
    """Write every hostile file under `dest`; payloads would create `marker`."""
    dest.mkdir(parents=True, exist_ok=True)
    specimens: list[Specimen] = []

    def add(name: str, data: bytes, *, upload_name: str, what: str, **kw: Any) -> None:
        path = dest / name
        path.write_bytes(data)
        specimens.append(
            Specimen(name, kw.pop("kind", "model"), what, str(path), upload_name, **kw)
        )

    live = payloads(marker)
    for label, payload in live.items():
        add(
            f"pickle_{label}.pt",
            pickle.dumps(payload, protocol=2),
            upload_name="model.pt",
            what=f"raw pickle running {label} via __reduce__",
            tags=["rce"],
        )
        add(
            f"pt_zip_{label}.pt",
            _torch_zip({"arch": {"name": "mlp"}, "state_dict": payload}),
            upload_name="model.pt",
            what=f"torch.save zip whose data.pkl runs {label}",
            tags=["rce"],
        )
    add(
        "pickle_proto0_os_system.pth",
        pickle.dumps(live["os_system"], protocol=0),
        upload_name="model.pth",
        what="protocol-0 (headerless) pickle running os.system",
        tags=["rce"],
    )
    import joblib

    for label in ("os_system", "exec"):
        buffer = io.BytesIO()
        joblib.dump(live[label], buffer)
        add(
            f"joblib_{label}.joblib",
            buffer.getvalue(),
            upload_name="model.joblib",
            what=f"joblib file running {label}",
            tags=["rce"],
        )
        add(
            f"joblib_{label}_renamed.pt",
            buffer.getvalue(),
            upload_name="model.pt",
            what=f"joblib file running {label}, renamed .pt",
            tags=["rce"],
        )
    quoted = str(marker).replace("'", "")
    add(
        "skops_reduce_os_system.skops",
        _skops_with_reduce("os", "system", [f"touch '{quoted}'"]),
        upload_name="model.skops",
        what="skops file whose ReduceNode calls os.system",
        tags=["rce"],
    )
    add(
        "skops_reduce_exec.skops",
        _skops_with_reduce("builtins", "exec", [f"open('{quoted}', 'w').write('x')"]),
        upload_name="model.skops",
        what="skops file whose ReduceNode calls builtins.exec",
        tags=["rce"],
    )
    add(
        "zip_bomb.pt",
        zip_bomb(),
        upload_name="model.pt",
        what=f"zip bomb declaring {BOMB_MEMBER_BYTES * BOMB_ENTRIES / 1024**3:.0f} GiB",
    )
    add(
        "zip_bomb_single.pt",
        zip_bomb(entries=1),
        upload_name="model.pt",
        what=f"one member expanding {BOMB_MEMBER_BYTES // 1024**2} MiB (ratio ~1000x)",
    )
    add(
        "zip_slip.pt",
        _zip_with({"../../archive/data.pkl": pickle.dumps({"arch": {}, "state_dict": {}})}),
        upload_name="model.pt",
        what="zip member climbing out with ../",
    )
    pt2 = pt2_bytes()
    add(
        "pt2_pickled_weight_exec.pt2",
        _pt2_pickled_weight(pt2, live["os_system"]),
        upload_name="model.pt2",
        what=".pt2 whose weight payload is a pickle running os.system (use_pickle=true)",
        tags=["rce"],
    )
    add(
        "pt2_sample_inputs_exec.pt2",
        pt2_edit(pt2, replace={"data/sample_inputs/model.pt": _torch_zip(live["exec"])}),
        upload_name="model.pt2",
        what=".pt2 whose sample-inputs pickle runs exec (torch retries it unsafely)",
        tags=["rce"],
    )
    add(
        "pt2_sympy_expr_exec.pt2",
        pt2_edit(pt2, program=_pt2_sympy_exec(marker)),
        upload_name="model.pt2",
        what=".pt2 whose shape expression (sympify-ed) runs os.system",
        tags=["rce"],
    )
    add(
        "pt2_custom_op.pt2",
        pt2_edit(pt2, program=_pt2_custom_op),
        upload_name="model.pt2",
        what=".pt2 whose graph calls torch.ops.evil_ns.backdoor (not allow-listed)",
    )
    add(
        "pt2_huge_tensor.pt2",
        pt2_edit(pt2, replace={"data/weights/weight_0": b""}, weights=_pt2_huge_tensor),
        upload_name="model.pt2",
        what=".pt2 declaring a 256 GiB weight with an empty payload",
    )
    from modules.storage.architectures import build_model

    bare = build_model({"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10})
    add(
        "pt_bare_state_dict.pt",
        _torch_zip(bare.state_dict()),
        upload_name="model.pt",
        what="torch.save(model.state_dict()) with no arch",
    )
    valid = checkpoint_bytes()
    add(
        "truncated.pt",
        valid[: len(valid) // 2],
        upload_name="model.pt",
        what="a valid checkpoint cut in half",
    )
    add(
        "oversize.pt",
        b"PK\x03\x04" + bytes(OVERSIZE_UPLOAD_BYTES),
        upload_name="model.pt",
        what=f"{OVERSIZE_UPLOAD_BYTES // 1024**2} MiB upload, over the 5 MB cap",
        cli=False,
    )
    sparse = dest / "oversize_sparse.pt"
    with open(sparse, "wb") as handle:
        handle.write(b"PK\x03\x04")
        handle.truncate(OVERSIZE_FILE_BYTES)  # sparse: no blocks written
    specimens.append(
        Specimen(
            "oversize_sparse.pt",
            "model",
            "513 MiB file, over the loaders' 512 MiB cap (sparse on disk)",
            str(sparse),
            "model.pt",
        )
    )
    add(
        "onnx_external_data.onnx",
        _onnx_external_data(),
        upload_name="model.onnx",
        what="ONNX initializer with external data at ../../etc/passwd",
    )
    add(
        "onnx_custom_op.onnx",
        _onnx_custom_op(),
        upload_name="model.onnx",
        what="ONNX node in custom op domain evil.custom",
    )
    add(
        "npz_object_arrays.npz",
        _npz_object_arrays(marker),
        upload_name="data.npz",
        what="npz whose arrays are pickled objects running os.system",
        kind="dataset",
        tags=["rce"],
    )
    for name, (what, text) in _job_specs().items():
        path = dest / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        specimens.append(Specimen(name, "jobspec", what, str(path), body=text))
    for name, upload_name, what in (
        ("filename_dotdot", "../../model.pt", "file name climbing out with ../"),
        ("filename_backslash", "..\\..\\model.pt", "file name climbing out with ..\\"),
        ("filename_absolute", "/etc/cron.d/model.pt", "absolute file name"),
        ("filename_nul", "model.pt\x00.txt", "file name with a NUL byte"),
        ("filename_long", "m" * 4096 + ".pt", "4,100-character file name"),
        ("filename_newline", "model\r\n.pt", "file name with CR LF"),
    ):
        specimens.append(
            Specimen(
                name,
                "filename",
                what,
                path=None,
                upload_name=upload_name,
                cli=False,
            )
        )
    (dest / "index.json").write_text(
        json.dumps([{**asdict(s), "body": None} for s in specimens], indent=2), encoding="utf-8"
    )
    return specimens


def main(argv: list[str] | None = None) -> int:
    """Write the corpus to a directory and print its index."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dest", type=Path, help="Directory to write the corpus to.")
    parser.add_argument(
        "--marker", type=Path, help="File the payloads would create (default DEST/MARKER)."
    )
    args = parser.parse_args(argv)
    marker = args.marker or args.dest / "MARKER"
    specimens = build_corpus(args.dest, marker.resolve())
    for specimen in specimens:
        print(json.dumps({"name": specimen.name, "kind": specimen.kind, "what": specimen.what}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())
