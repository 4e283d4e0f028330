"""Safe reading and writing of torch.export programs (`.pt2` archives).

`torch.export.load` is not safe for an untrusted file: on torch 2.13 an embedded tensor
pickle that fails under `weights_only=True` is retried with `weights_only=False`, weight and
constant payloads marked `use_pickle` are loaded with `weights_only=False` outright, "opaque"
constants go through `pickle.loads`, symbolic shape expressions go through `sympy.sympify`
(which evaluates Python), and the program's `guards_code` is `exec`-ed when the module is
built. So this reader never calls it. It checks the archive's members, parses the program
JSON itself and refuses any operator outside the allow-list (aten, prims, Python `operator`
builtins), any script/custom object, subgraph or shape expression outside a small arithmetic
grammar; it bounds the declared tensor sizes before reading a byte of them, loads any
pickled payload with `weights_only=True` and refuses on failure, ignores the pickled sample
inputs, and only then hands the checked parts to torch's `ExportedProgramDeserializer`.

torch is imported inside the functions, so `is_pt2_archive` costs nothing to import.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from modules.errors import BadInputError, ModelFormatError, UnsafeModelError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.export import ExportedProgram

# Same bound as a module tree's (modules.storage.arch_tree.MAX_PARAMS), counted in elements
# over every weight and constant the archive declares.
MAX_PT2_ELEMENTS = 200_000_000
MAX_PT2_TENSOR_BYTES = 1024**3
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_GRAPH_NODES = 100_000
MAX_EXPR_CHARS = 2_000
# The largest batch a re-exported program accepts (its dynamic batch dimension's bound).
MAX_BATCH = 65_536

MODEL_NAME = "model"
# The meta that travels with a saved model (plain JSON, like a checkpoint's "meta").
META_MEMBER = "extra/mcaas_meta.json"
_FIXED_MEMBERS = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        f"models/{MODEL_NAME}.json",
        f"data/weights/{MODEL_NAME}_weights_config.json",
        f"data/constants/{MODEL_NAME}_constants_config.json",
        f"data/sample_inputs/{MODEL_NAME}.pt",
    }
)
_PAYLOAD_DIRS = ("data/weights/", "data/constants/")
_PAYLOAD_NAME = re.compile(r"^(weight|tensor)_[0-9]{1,9}$")

# Python `operator` builtins a graph may call (shape arithmetic and tuple indexing).
_OPERATOR_BUILTINS = frozenset(
    {
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "neg",
        "pos",
        "abs",
        "pow",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
    }
)
_TORCH_OP = re.compile(r"^torch\.ops\.(aten|prims)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")
# aten ops that read files or fabricate storage; everything else in aten/prims is a kernel.
_DENIED_ATEN = frozenset({"from_file", "_nested_from_padded_tensor", "set_"})

# Symbolic shape expressions are handed to sympy.sympify, which evaluates them as Python; so
# they must be arithmetic over shape symbols (s0, u3, ...), numbers and sympy's shape helpers.
_EXPR_TOKEN = re.compile(
    r"\s+|'[a-z]{1,4}[0-9]{1,9}'|[0-9]+(?:\.[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*|\*\*|//|[-+*/%(),<>=!]"
)
_SYMBOL = re.compile(r"^[a-z]{1,4}[0-9]{1,9}$")
_EXPR_NAMES = frozenset(
    {
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "True",
        "False",
        "oo",
        "floor",
        "ceiling",
        # serialized symbols read like Symbol('s77', positive=True, integer=True)
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Add",
        "Mul",
        "Pow",
        "positive",
        "negative",
        "nonnegative",
        "nonzero",
        "integer",
        "real",
        "finite",
    }
)
# Keys of the program JSON that carry objects this reader never admits.
_REFUSED_KEYS = {
    "as_custom_obj": "a script object (torch.ScriptObject / custom class)",
    "as_custom_objs": "script objects (torch.ScriptObject / custom class)",
    "custom_obj": "a script object input (torch.ScriptObject / custom class)",
    "as_graph": "a subgraph (higher-order operator)",
    "as_graphs": "subgraphs (higher-order operator)",
}
_KEPT_NODE_METADATA = ("stack_trace", "nn_module_stack")

# schema.ScalarType number -> torch dtype name, for the dtypes a weight may have.
_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    12: "bool",
    13: "bfloat16",
}
_ITEM_BYTES = {
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "bool": 1,
    "bfloat16": 2,
}


def is_pt2_archive(names: Sequence[str]) -> bool:
    """Whether a zip's member names are those of a torch.export archive."""
    return any(
        PurePosixPath(name).name == "archive_format"
        or (len(PurePosixPath(name).parts) == 3 and PurePosixPath(name).parts[1] == "models")
        for name in names
    )


# --- archive members -----------------------------------------------------------------------------


class _Archive:
    """The members of a checked .pt2 zip, by their name under the archive's one top folder."""

    def __init__(self, data: bytes) -> None:
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            raise ModelFormatError(f"truncated or corrupt .pt2 archive ({exc})") from exc
        tops = {info.filename.split("/", 1)[0] for info in infos}
        if len(tops) != 1 or any("/" not in info.filename for info in infos):
            raise ModelFormatError(
                f".pt2 archive must hold one top folder (torch.export.save writes 'archive/'), "
                f"got {sorted(tops)[:5]}"
            )
        top = tops.pop()
        self.sizes: dict[str, int] = {}
        for info in infos:
            name = info.filename.split("/", 1)[1]
            if info.is_dir() or not name:
                continue
            _check_member_name(name)
            self.sizes[name] = info.file_size
        self._top = top

    def read(self, name: str, *, limit: int) -> bytes:
        size = self.sizes.get(name)
        if size is None:
            raise ModelFormatError(f".pt2 archive has no member {name!r}")
        if size > limit:
            raise UnsafeModelError(
                f".pt2 member {name!r} declares {size:,} bytes, over the limit of {limit:,}"
            )
        try:
            with self.zip.open(f"{self._top}/{name}") as member:
                raw = member.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise ModelFormatError(f"cannot read .pt2 member {name!r}: {exc}") from exc
        if len(raw) != size:
            raise ModelFormatError(
                f".pt2 member {name!r} holds {len(raw):,} bytes but declares {size:,}"
            )
        return raw

    def read_json(self, name: str) -> Any:
        raw = self.read(name, limit=MAX_JSON_BYTES)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ModelFormatError(f".pt2 member {name!r} is not valid JSON: {exc}") from exc


def _check_member_name(name: str) -> None:
    if name in _FIXED_MEMBERS or name.startswith("extra/"):
        return
    directory, _, base = name.rpartition("/")
    if f"{directory}/" in _PAYLOAD_DIRS and _PAYLOAD_NAME.match(base):
        return
    if name.startswith("data/aotinductor/"):
        raise ModelFormatError(
            ".pt2 archive holds an AOTInductor compiled package (native code), which is not "
            "accepted; save the program with torch.export.save"
        )
    if name.startswith("models/"):
        raise ModelFormatError(
            f".pt2 archive holds program {name!r}; only one program, named {MODEL_NAME!r} "
            "(what torch.export.save writes), is accepted"
        )
    raise UnsafeModelError(f".pt2 archive has unexpected member {name!r}")


# --- the program JSON ----------------------------------------------------------------------------


def check_target(target: str) -> None:
    """Refuse an operator outside aten, prims and Python `operator` builtins."""
    if target.startswith("_operator."):
        if target[len("_operator.") :] in _OPERATOR_BUILTINS:
            return
    else:
        match = _TORCH_OP.match(target)
        if match is not None and not (match.group(1) == "aten" and match.group(2) in _DENIED_ATEN):
            return
    raise UnsafeModelError(
        f"the program calls operator {target[:120]!r}, which is not allowed; accepted "
        "operators: torch.ops.aten.*, torch.ops.prims.* and Python operator builtins (no "
        "custom ops, no higher-order ops)"
    )


def check_expr(expr: str) -> None:
    """Refuse a symbolic shape expression that is not plain arithmetic over shape symbols."""
    if len(expr) > MAX_EXPR_CHARS:
        raise UnsafeModelError(f"shape expression is over {MAX_EXPR_CHARS} characters")
    position = 0
    tokens: list[str] = []
    while position < len(expr):
        match = _EXPR_TOKEN.match(expr, position)
        if match is None:
            raise UnsafeModelError(
                f"shape expression {expr[:80]!r} has an unexpected character at {position}"
            )
        position = match.end()
        if not match.group().isspace():
            tokens.append(match.group())
    for i, token in enumerate(tokens):
        if token[0].isalpha() or token[0] == "_":
            if token not in _EXPR_NAMES and not _SYMBOL.match(token):
                raise UnsafeModelError(
                    f"shape expression {expr[:80]!r} names {token!r}, which is not a shape "
                    "symbol or an arithmetic helper"
                )
        elif token[0].isdigit() and len(token) > 30:
            raise UnsafeModelError(f"shape expression {expr[:80]!r} has an oversized number")
        elif token == "**":
            following = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not (following.isdigit() and len(following) <= 2):
                raise UnsafeModelError(
                    f"shape expression {expr[:80]!r} raises to a power other than a small integer"
                )


def _walk_program(node: Any, where: str) -> None:
    """Check every key of the program JSON that names code: targets, objects, expressions."""
    pending: list[tuple[Any, str]] = [(node, where)]
    while pending:
        value, path = pending.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                if key in _REFUSED_KEYS:
                    raise UnsafeModelError(
                        f"the program holds {_REFUSED_KEYS[key]} at {path}.{key}; only tensor "
                        "programs of aten/prims operators are accepted"
                    )
                if key == "as_operator" and isinstance(item, str):
                    check_target(item)
                elif key == "expr_str":
                    if not isinstance(item, str):
                        raise ModelFormatError(f"{path}.expr_str is not a string")
                    check_expr(item)
                elif key == "target" and not isinstance(item, str):
                    raise ModelFormatError(f"{path}.target is not a string")
                pending.append((item, f"{path}.{key}"))
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _check_program(program: Any) -> dict[str, Any]:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ModelFormatError(".pt2 program JSON has no graph_module")
    graph = program["graph_module"].get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ModelFormatError(".pt2 program JSON has no graph nodes")
    nodes = graph["nodes"]
    if len(nodes) > MAX_GRAPH_NODES:
        raise UnsafeModelError(f"the program has {len(nodes):,} nodes, over {MAX_GRAPH_NODES:,}")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("target"), str):
            raise ModelFormatError(f"graph node {i} has no operator target")
        check_target(node["target"])
        metadata = node.get("metadata")
        # Only what the module needs; the rest (source_fn_stack, torch_fn) is resolved by name.
        if isinstance(metadata, dict):
            node["metadata"] = {
                k: v for k, v in metadata.items() if k in _KEPT_NODE_METADATA and isinstance(v, str)
            }
    _walk_program(program, "program")
    # guards_code is exec-ed when the module is built; the loaded module checks no guards,
    # its inputs are checked against meta["inputs"] instead.
    program["guards_code"] = []
    return program


# --- tensors -------------------------------------------------------------------------------------


def _as_int(value: Any, where: str) -> int:
    inner = value.get("as_int") if isinstance(value, Mapping) else None
    if not isinstance(inner, int) or isinstance(inner, bool) or inner < 0:
        raise UnsafeModelError(f"{where}: expected a concrete non-negative size, got {value!r}")
    return inner


def load_weights_only(raw: bytes, where: str) -> Any:
    """torch.load(weights_only=True) of an embedded pickle; any refusal is an UnsafeModelError."""
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # torch's message goes on to suggest weights_only=False; keep only what it refused.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", text)
        reason = found.group() if found else "refused by the weights-only unpickler"
        raise UnsafeModelError(
            f"{where}: its pickle does not load with weights_only=True ({reason}); it is never "
            "unpickled otherwise"
        ) from exc
    except Exception as exc:  # corrupt archives raise whatever the reader hits
        raise ModelFormatError(f"{where}: cannot read its pickle: {exc}") from exc


class _Payloads:
    """The weights and constants of a .pt2, each read only after its declared size is checked."""

    def __init__(self, archive: _Archive) -> None:
        self.archive = archive
        self.elements = 0

    def load(self, kind: str) -> dict[str, Any]:
        directory = f"data/{kind}/"
        config_name = f"{directory}{MODEL_NAME}_{kind}_config.json"
        if config_name not in self.archive.sizes:
            return {}
        config = self.archive.read_json(config_name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise ModelFormatError(f".pt2 member {config_name!r} has no 'config' mapping")
        storages: dict[str, torch.Tensor] = {}
        out: dict[str, Any] = {}
        for fqn, entry in entries.items():
            where = f"{kind} {fqn!r}"
            if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
                raise ModelFormatError(f"{where}: malformed payload entry")
            path = entry["path_name"]
            if not _PAYLOAD_NAME.match(path) or f"{directory}{path}" not in self.archive.sizes:
                raise UnsafeModelError(f"{where}: payload {path!r} is not a tensor in the archive")
            if entry.get("use_pickle"):
                out[fqn] = self._pickled(f"{directory}{path}", where)
            else:
                out[fqn] = self._strided(entry, f"{directory}{path}", where, storages)
        return out

    def _count(self, numel: int, where: str) -> None:
        self.elements += numel
        if self.elements > MAX_PT2_ELEMENTS:
            raise UnsafeModelError(
                f"the program's tensors hold over {MAX_PT2_ELEMENTS:,} elements (reached "
                f"{self.elements:,} at {where}); refusing to load it"
            )

    def _pickled(self, member: str, where: str) -> torch.Tensor:
        import torch

        value = load_weights_only(self.archive.read(member, limit=MAX_PT2_TENSOR_BYTES), where)
        if not isinstance(value, torch.Tensor):
            raise UnsafeModelError(f"{where}: its pickle holds a {type(value).__name__}")
        self._count(value.numel(), where)
        return value

    def _strided(
        self, entry: dict[str, Any], member: str, where: str, storages: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        import torch

        meta = entry.get("tensor_meta")
        if not isinstance(meta, dict):
            raise ModelFormatError(f"{where}: no tensor_meta")
        dtype_name = _DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
        if dtype_name is None:
            raise UnsafeModelError(f"{where}: unsupported dtype code {meta.get('dtype')!r}")
        sizes_raw, strides_raw = meta.get("sizes"), meta.get("strides")
        if not isinstance(sizes_raw, list) or not isinstance(strides_raw, list):
            raise ModelFormatError(f"{where}: sizes and strides must be lists")
        if len(sizes_raw) != len(strides_raw) or len(sizes_raw) > 8:
            raise ModelFormatError(f"{where}: sizes and strides do not match (or over 8 dims)")
        sizes = [_as_int(v, f"{where} size") for v in sizes_raw]
        strides = [_as_int(v, f"{where} stride") for v in strides_raw]
        offset = _as_int(meta.get("storage_offset", {"as_int": 0}), f"{where} offset")
        numel = math.prod(sizes)
        self._count(numel, where)
        item = _ITEM_BYTES[dtype_name]
        stored = self.archive.sizes[member]
        reach = sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
        extent = 0 if numel == 0 else offset + reach + 1
        if extent * item > stored:
            raise UnsafeModelError(
                f"{where}: declares a {sizes} {dtype_name} tensor ({extent * item:,} bytes) but "
                f"its payload holds {stored:,} bytes"
            )
        if stored % item:
            raise ModelFormatError(f"{where}: payload size is not a multiple of {dtype_name}")
        if member not in storages:
            raw = self.archive.read(member, limit=MAX_PT2_TENSOR_BYTES)
            dtype = getattr(torch, dtype_name)
            storages[member] = (
                torch.frombuffer(bytearray(raw), dtype=dtype)
                if raw
                else torch.empty(0, dtype=dtype)
            )
        tensor = torch.as_strided(storages[member], sizes, strides, offset)
        if entry.get("is_param"):
            return torch.nn.Parameter(tensor, requires_grad=bool(meta.get("requires_grad")))
        return tensor


# --- loading -------------------------------------------------------------------------------------


def _check_loaded_graph(program: ExportedProgram) -> None:
    """The deserialized graph calls only allow-listed operators (a check after the JSON one)."""
    import operator

    import torch

    for node in program.graph.nodes:
        if node.op == "call_function":
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                check_target(
                    f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
                )
            elif getattr(operator, name := str(getattr(target, "__name__", "")), None) is target:
                check_target(f"_operator.{name}")
            else:
                check_target(str(target))
        elif node.op not in ("placeholder", "output", "get_attr"):
            raise UnsafeModelError(f"the program has a {node.op!r} node, which is not allowed")


def load_pt2_program(data: bytes) -> ExportedProgram:
    """Check a .pt2 archive and build its ExportedProgram without unpickling code."""
    import torch
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    archive = _Archive(data)
    fmt = archive.read("archive_format", limit=64) if "archive_format" in archive.sizes else b""
    if fmt.strip() != b"pt2":
        raise ModelFormatError(f".pt2 archive_format is {fmt[:16]!r}, expected b'pt2'")
    if "byteorder" in archive.sizes and archive.read("byteorder", limit=16) != b"little":
        raise ModelFormatError(".pt2 archive is big-endian; only little-endian is read")
    program = _check_program(archive.read_json(f"models/{MODEL_NAME}.json"))
    payloads = _Payloads(archive)
    state_dict = payloads.load("weights")
    constants = payloads.load("constants")
    sample_inputs = f"data/sample_inputs/{MODEL_NAME}.pt"
    if sample_inputs in archive.sizes:
        # Never used (example_inputs=None below), but torch would unpickle it unsafely, so a
        # file whose sample inputs need code is refused like any other such pickle.
        load_weights_only(archive.read(sample_inputs, limit=MAX_JSON_BYTES), "sample inputs")
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        # The pickled sample inputs are never read: example_inputs=None.
        exported = ExportedProgramDeserializer().deserialize(
            serialized, state_dict, constants, None
        )
    except BadInputError:
        raise
    except Exception as exc:  # a program torch cannot rebuild, whatever it raised
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ModelFormatError(
            f"cannot rebuild the torch.export program: {type(exc).__name__}: {reason}"
        ) from exc
    _check_loaded_graph(exported)
    if not isinstance(exported, torch.export.ExportedProgram):
        raise ModelFormatError("the .pt2 archive did not hold an ExportedProgram")
    return exported


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def program_meta(program: ExportedProgram) -> dict[str, Any]:
    """meta["inputs"] (per-sample shapes, None for a dynamic dim) plus in_features/num_classes."""
    import torch

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs: list[dict[str, Any]] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != torch.export.graph_signature.InputKind.USER_INPUT:
            continue
        name = str(getattr(spec.arg, "name", ""))
        node = placeholders.get(name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(
                f"the program's input {name!r} is not a tensor; only tensor inputs are accepted"
            )
        if value.dim() == 0:
            raise ModelFormatError(f"the program's input {name!r} has no batch dimension")
        shape = [_dim(d) for d in value.shape[1:]]
        inputs.append({"name": name, "shape": shape, "dtype": str(value.dtype)[6:]})
    if not inputs:
        raise ModelFormatError("the program takes no tensor input")
    meta: dict[str, Any] = {"format": "pt2", "inputs": inputs}
    first = inputs[0]
    flat = len(inputs) == 1 and first["dtype"].startswith("float") and len(first["shape"]) == 1
    if flat and isinstance(first["shape"][0], int):
        meta["in_features"] = first["shape"][0]
    outputs = [n for n in program.graph.nodes if n.op == "output"]
    if outputs:
        values = outputs[0].args[0]
        if isinstance(values, list | tuple) and len(values) == 1:
            value = getattr(values[0], "meta", {}).get("val")
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                classes = _dim(value.shape[1])
                if classes is not None:
                    meta["num_classes"] = classes
    return meta


def _stored_meta(data: bytes) -> dict[str, Any]:
    archive = _Archive(data)
    if META_MEMBER not in archive.sizes:
        return {}
    stored = archive.read_json(META_MEMBER)
    if not isinstance(stored, dict):
        raise ModelFormatError(f".pt2 member {META_MEMBER!r} must hold a JSON object")
    return stored


def load_pt2(data: bytes) -> tuple[nn.Module, dict[str, Any]]:
    """The module (`ExportedProgram.module()`) and meta of a checked .pt2 archive."""
    program = load_pt2_program(data)
    # What the program itself says (inputs, sizes) wins over what the stored meta claims.
    meta = {**_stored_meta(data), **program_meta(program)}
    try:
        module = program.module()
    except Exception as exc:  # unlifting failures are a program we cannot run
        raise ModelFormatError(f"cannot build a module from the program: {exc}") from exc
    # ExportedProgram.module() makes train()/eval() raise. Every step calls eval(), so the
    # plain nn.Module methods come back: they set the flag only, and the graph keeps the mode
    # it was exported in (eval, for a model exported for inference).
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module, meta


# --- writing -------------------------------------------------------------------------------------

_EXAMPLE_DYNAMIC_SIZE = 8


def _input_specs(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    specs = meta.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise BadInputError("a .pt2 model's meta has no 'inputs' list")
    for spec in specs:
        if (
            not isinstance(spec, Mapping)
            or not isinstance(spec.get("name"), str)
            or not isinstance(spec.get("shape"), list)
            or spec.get("dtype") not in _ITEM_BYTES
        ):
            raise BadInputError(
                f"meta['inputs'] entry {spec!r} needs a 'name', a 'shape' list and a dtype in "
                f"{sorted(_ITEM_BYTES)}"
            )
        for dim in spec["shape"]:
            if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
                raise BadInputError(f"meta['inputs'] {spec['name']!r} has a bad dim {dim!r}")
    return list(specs)


def example_inputs(meta: Mapping[str, Any], batch: int) -> tuple[torch.Tensor, ...]:
    """Example tensors for meta["inputs"]: `batch` samples, dynamic dims of size 8.

    Float inputs are seeded standard normals, integer inputs zeros (a valid token id), bools
    true (a mask that keeps everything).
    """
    import torch

    if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise BadInputError(f"batch must be an int in [1, {MAX_BATCH}], got {batch!r}")
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for spec in _input_specs(meta):
        shape = [batch, *(_EXAMPLE_DYNAMIC_SIZE if d is None else d for d in spec["shape"])]
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.ones(shape, dtype=dtype))
        else:
            tensors.append(torch.zeros(shape, dtype=dtype))
    return tuple(tensors)


def _set_training(module: nn.Module, mode: bool) -> bool:
    try:
        module.train(mode)
    except NotImplementedError:
        return False
    return True


def save_pt2(module: nn.Module, meta: Mapping[str, Any]) -> bytes:
    """Re-export `module` with a dynamic batch dim (and dynamic None dims) as .pt2 bytes."""
    import torch

    specs = _input_specs(meta)
    examples = example_inputs(meta, 2)
    dynamic = tuple(
        {0: torch.export.Dim.AUTO}
        | {i + 1: torch.export.Dim.AUTO for i, d in enumerate(spec["shape"]) if d is None}
        for spec in specs
    )
    was_training = module.training
    # A module from ExportedProgram.module() refuses eval(); its graph is already fixed.
    switched = _set_training(module, False)
    try:
        program = torch.export.export(module, examples, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # export failures name the unsupported construct
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise BadInputError(
            f"cannot export the model as .pt2: {type(exc).__name__}: {reason}"
        ) from exc
    finally:
        if switched:
            _set_training(module, was_training)
    buffer = io.BytesIO()
    extra = {META_MEMBER.removeprefix("extra/"): json.dumps(dict(meta), sort_keys=True)}
    torch.export.save(program, buffer, extra_files=extra)
    return buffer.getvalue()
