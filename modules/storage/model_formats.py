"""Safe load and save of models: torch checkpoints, skops files and ONNX graphs.

Uploads are untrusted. The format is decided by content; the filename suffix is only
a cross-check. Raw pickle/joblib streams are refused outright. A torch file must be
a weights-only checkpoint `{"format": "mcaas.torch/1", "arch", "state_dict", "meta"}`
(or a bare `{"arch", "state_dict"}`): its zip is checked, then picklescan gates it,
then `torch.load(weights_only=True)` reads it and the model is rebuilt from the arch.
Only `trust_pickle=True` (the local CLI's --trust-pickle) unpickles a full nn.Module.

torch, onnx, skops and picklescan are imported inside the functions that use them,
so the API can import this module without importing torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import pickletools
import re
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from modules.core.artifact import ModelArtifact
from modules.errors import (
    BadInputError,
    IncompatibleError,
    ModelFormatError,
    UnsafeModelError,
)

if TYPE_CHECKING:
    import onnx
    from torch import nn

MAX_MODEL_BYTES = 512 * 1024 * 1024
MAX_ZIP_MEMBERS = 10_000
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3
# Members above this size may not expand more than MAX_COMPRESSION_RATIO times; torch and
# skops write stored (uncompressed) members, so a high ratio means a crafted archive.
MAX_COMPRESSION_RATIO = 100
_RATIO_CHECK_MIN_BYTES = 1024 * 1024

TORCH_FORMAT = "mcaas.torch/1"

# What skops.io.get_untrusted_types reports for the fitted model types this project uses
# (KNeighborsClassifier with brute/kd_tree/ball_tree and the common metrics, random and
# extra trees, decision trees, LogisticRegression, Pipeline, StandardScaler,
# VarianceThreshold, SelectKBest(f_classif | mutual_info_classif), SelectFromModel) with
# scikit-learn 1.9 and skops 0.16. Everything else skops itself already trusts.
TRUSTED_SKLEARN_TYPES: frozenset[str] = frozenset(
    {
        "sklearn.tree._tree.Tree",
        "sklearn.neighbors._kd_tree.KDTree",
        "sklearn.neighbors._ball_tree.BallTree",
        "sklearn.metrics._dist_metrics.EuclideanDistance64",
        "sklearn.metrics._dist_metrics.ManhattanDistance64",
        "sklearn.metrics._dist_metrics.ChebyshevDistance64",
        "sklearn.metrics._dist_metrics.MinkowskiDistance64",
        "sklearn.feature_selection._univariate_selection.f_classif",
        "sklearn.feature_selection._mutual_info.mutual_info_classif",
        # Our own SelectKBest score function (feature_prune's "importance" method): a plain
        # function in this package, so loading it by name runs no code from the file.
        "modules.compression.feature_prune.forest_importances",
    }
)

ALLOWED_ONNX_DOMAINS: frozenset[str] = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# Globals picklescan calls "suspicious" that torch.load(weights_only=True) also accepts and a
# plain weights checkpoint may hold (e.g. a dict of nn.Parameter instead of a state_dict).
_EXTRA_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("torch._utils", "_rebuild_parameter")}
)

_SUFFIX_KIND: dict[str, str] = {
    ".pt": "torch",
    ".pth": "torch",
    ".ckpt": "torch",
    ".skops": "sklearn",
    ".onnx": "onnx",
    ".pt2": "pt2",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".joblib": "pickle",
}
_KIND_WORDS = {
    "torch": "a torch checkpoint",
    "pt2": "a torch.export program (.pt2)",
    "sklearn": "a skops (scikit-learn) file",
    "onnx": "an ONNX model",
    "pickle": "a pickle/joblib file",
}
_PICKLE_REFUSAL = (
    "the file is a raw pickle stream (pickle, joblib or the legacy torch.save format); "
    "unpickling it could run arbitrary code, so it is never loaded. Save torch models as "
    "torch.save({'arch': ..., 'state_dict': model.state_dict()}) and scikit-learn models "
    "with skops.io.dump"
)
_NOT_WEIGHTS_ONLY = (
    "the file is not a weights-only checkpoint (it needs code to unpickle, e.g. a full "
    "pickled nn.Module); save {'arch': ..., 'state_dict': model.state_dict()} instead, or, "
    "for a file you made yourself, load it with trust_pickle (the CLI's --trust-pickle)"
)


# --- sniffing ------------------------------------------------------------------------------------


def _looks_like_pickle(data: bytes) -> bool:
    if len(data) >= 2 and data[0] == 0x80 and 1 <= data[1] <= 5:
        return True
    # Protocol 0/1 pickles have no header: a stream that parses up to STOP is one.
    # pickletools.genops only decodes opcodes; it never imports or calls anything.
    try:
        for opcode, _, _ in pickletools.genops(io.BytesIO(data[: 1024 * 1024])):
            if opcode.name == "STOP":
                return True
    except Exception:  # any decoding error means "not a pickle"
        return False
    return False


def _check_zip(data: bytes) -> list[str]:
    """Check a zip's structure before anything reads its members; return the member names."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ModelFormatError(f"truncated or corrupt zip archive ({exc})") from exc
    if len(infos) > MAX_ZIP_MEMBERS:
        raise UnsafeModelError(
            f"zip archive has {len(infos)} members, over the limit of {MAX_ZIP_MEMBERS}"
        )
    names = [info.filename for info in infos]
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if (
            name.startswith(("/", "\\"))
            or (len(name) > 1 and name[1] == ":")
            or ".." in parts
            or "\x00" in name
        ):
            raise UnsafeModelError(f"zip member name {name!r} is absolute or climbs out with '..'")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise UnsafeModelError(f"zip archive repeats member name(s) {duplicates[:5]}")
    total = sum(info.file_size for info in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise UnsafeModelError(
            f"zip archive declares {total:,} uncompressed bytes, over the limit of "
            f"{MAX_UNCOMPRESSED_BYTES:,} (zip bomb?)"
        )
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise UnsafeModelError(
                f"zip member {info.filename!r} expands {ratio:.0f}x ({info.compress_size:,} -> "
                f"{info.file_size:,} bytes), over the limit of {MAX_COMPRESSION_RATIO}x (zip bomb?)"
            )
    return names


def _zip_kind(data: bytes) -> str:
    from modules.storage.pt2 import is_pt2_archive

    names = _check_zip(data)
    if "schema.json" in names:
        return "sklearn"
    if is_pt2_archive(names):
        return "pt2"
    if any(PurePosixPath(name).name == "constants.pkl" for name in names) or any(
        "/code/" in name for name in names
    ):
        raise ModelFormatError(
            "the file is a TorchScript archive, which is not accepted; save "
            "{'arch': ..., 'state_dict': model.state_dict()} with torch.save instead"
        )
    if any(PurePosixPath(name).name == "data.pkl" for name in names):
        return "torch"
    raise ModelFormatError(
        "zip archive is neither a torch checkpoint (no data.pkl), a torch.export program (no "
        "archive_format) nor a skops file (no schema.json)"
    )


def _parse_onnx(data: bytes) -> onnx.ModelProto | None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        return None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        return None
    return model


def _content_kind(data: bytes) -> str:
    """'torch' | 'pt2' | 'sklearn' | 'onnx' from the bytes alone; pickles are refused."""
    if not data:
        raise ModelFormatError("the model file is empty (0 bytes)")
    if len(data) > MAX_MODEL_BYTES:
        raise ModelFormatError(
            f"the model file is {len(data):,} bytes, over the limit of {MAX_MODEL_BYTES:,}"
        )
    if data[:4] == b"PK\x03\x04":
        return _zip_kind(data)
    if _looks_like_pickle(data):
        raise UnsafeModelError(_PICKLE_REFUSAL)
    if _parse_onnx(data) is not None:
        return "onnx"
    raise ModelFormatError(
        f"unrecognised or corrupt model file ({len(data):,} bytes starting {data[:8]!r}): expected "
        "a torch zip checkpoint (.pt), a torch.export program (.pt2), a skops file (.skops) or "
        "an ONNX model (.onnx)"
    )


def _check_suffix(kind: str, filename: str | None) -> None:
    if not filename:
        return
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if not suffix:
        return
    claimed = _SUFFIX_KIND.get(suffix)
    if claimed is None:
        raise ModelFormatError(
            f"unsupported model file suffix {suffix!r} in {filename!r}; expected one of "
            f"{', '.join(s for s, k in _SUFFIX_KIND.items() if k != 'pickle')}"
        )
    if claimed != kind:
        raise ModelFormatError(
            f"{filename!r} is named like {_KIND_WORDS[claimed]} ({suffix}) but its content is "
            f"{_KIND_WORDS[kind]}"
        )


def sniff_format(data: bytes, filename: str | None = None) -> str:
    """'torch' | 'pt2' | 'sklearn' | 'onnx' by content, the filename suffix as a cross-check."""
    kind = _content_kind(data)
    _check_suffix(kind, filename)
    return kind


# --- torch ---------------------------------------------------------------------------------------


def _scan_pickles(data: bytes, *, trust_pickle: bool) -> None:
    """Gate a torch zip with picklescan: dangerous globals or a failed scan refuse the file."""
    from picklescan.scanner import SafetyLevel, scan_bytes

    try:
        result = scan_bytes(io.BytesIO(data), "upload.pt", ".pt")
    except Exception as exc:  # the scanner failing counts as a rejection, whatever it raised
        raise UnsafeModelError(f"pickle scan failed: {type(exc).__name__}: {exc}") from exc
    if result.scan_err or result.scanned_files == 0:
        raise UnsafeModelError("pickle scan failed: the checkpoint's pickle could not be parsed")
    dangerous = sorted(
        {f"{g.module}.{g.name}" for g in result.globals if g.safety is SafetyLevel.Dangerous}
    )
    if dangerous:
        raise UnsafeModelError(
            f"the file imports dangerous globals when unpickled: {', '.join(dangerous)}"
        )
    suspicious = sorted(
        {
            f"{g.module}.{g.name}"
            for g in result.globals
            if g.safety is SafetyLevel.Suspicious and (g.module, g.name) not in _EXTRA_SAFE_GLOBALS
        }
    )
    if suspicious and not trust_pickle:
        raise UnsafeModelError(f"{_NOT_WEIGHTS_ONLY}; it imports {', '.join(suspicious[:10])}")


def _linear_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of nn.Linear and the zoo's Int8Linear/Float16Linear alike."""
    if any(True for _ in module.children()):
        return None
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features
    return None


def torch_io_dims(module: nn.Module) -> dict[str, int]:
    """in_features (first linear or Unflatten) and num_classes (last linear), where derivable."""
    import math

    from torch import nn

    dims: dict[str, int] = {}
    for sub in module.modules():
        sizes = _linear_sizes(sub)
        if sizes is not None:
            dims["in_features"] = sizes[0]
            break
        if isinstance(sub, nn.Unflatten) and sub.dim in (1, -1):
            dims["in_features"] = math.prod(int(v) for v in sub.unflattened_size)
            break
        if isinstance(sub, nn.Conv2d):
            break
    linears = [sizes for sub in module.modules() if (sizes := _linear_sizes(sub)) is not None]
    if linears:
        dims["num_classes"] = linears[-1][1]
    return dims


def _plain_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Meta as plain JSON types, so a weights-only load can read it back."""

    def convert(value: Any) -> Any:
        for method in ("tolist", "item"):
            if hasattr(value, method):
                return getattr(value, method)()
        if isinstance(value, Path | PurePosixPath):
            return str(value)
        raise TypeError(f"{type(value).__name__} is not a JSON type")

    try:
        plain: dict[str, Any] = json.loads(json.dumps(meta, default=convert))
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"model meta must hold plain JSON values: {exc}") from exc
    return plain


def _save_torch(artifact: ModelArtifact) -> bytes:
    import torch
    from torch import nn

    from modules.storage.arch_tree import arch_of
    from modules.storage.architectures import named_arch_matches

    module = artifact.obj
    if not isinstance(module, nn.Module):
        raise BadInputError(f"a torch artifact must hold an nn.Module, got {type(module).__name__}")
    given_arch = artifact.meta.get("arch")
    # A torchvision-layout model is saved by its name while it is still exactly that arch;
    # anything else (and every changed model) as its module tree.
    arch = given_arch if named_arch_matches(module, given_arch) else arch_of(module)
    meta = {k: v for k, v in artifact.meta.items() if k not in ("arch", "trusted_pickle")}
    if "zoo_arch" not in meta and isinstance(given_arch, dict) and given_arch.get("name") != "tree":
        meta["zoo_arch"] = given_arch
    meta.update(torch_io_dims(module))
    state = {
        key: value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for key, value in module.state_dict().items()
    }
    buffer = io.BytesIO()
    torch.save(
        {"format": TORCH_FORMAT, "arch": arch, "state_dict": state, "meta": _plain_meta(meta)},
        buffer,
    )
    return buffer.getvalue()


def _torch_load(data: bytes, *, trust_pickle: bool) -> Any:
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=not trust_pickle, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise ModelFormatError(f"could not unpickle the torch file: {exc}") from exc
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsafeModelError(f"{_NOT_WEIGHTS_ONLY} (torch said: {reason})") from exc
    except Exception as exc:  # corrupt members, bad tensors, missing classes: all a bad file
        raise ModelFormatError(
            f"could not read the torch checkpoint: {type(exc).__name__}: {exc}"
        ) from exc


def _trusted_module_artifact(module: nn.Module) -> ModelArtifact:
    from modules.storage.arch_tree import arch_of

    meta: dict[str, Any] = {"trusted_pickle": True, **torch_io_dims(module)}
    # A custom module type is usable in-process but has no tree, so it cannot be saved.
    with contextlib.suppress(BadInputError):
        meta["arch"] = arch_of(module)
    module.eval()
    return ModelArtifact("torch", module, meta)


_BARE_STATE_DICT = (
    "a bare state_dict has no architecture: name the arch beside the file (the CLI's --arch "
    "resnet18, the API's form field arch=resnet18, or a JSON arch), or save a dict with 'arch' "
    "and 'state_dict': {'arch': {...}, 'state_dict': model.state_dict()}"
)
_ARCH_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_ARCH_CHARS = 4096


def parse_arch(value: Any) -> dict[str, Any] | None:
    """An arch given beside a file: a name ('resnet18'), a JSON object text, or a dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise BadInputError(f"arch: expected a name or a JSON object, got {type(value).__name__}")
    text = value.strip()
    if len(text) > MAX_ARCH_CHARS:
        raise BadInputError(f"arch: longer than {MAX_ARCH_CHARS} characters")
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise BadInputError(f"arch: not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise BadInputError("arch: the JSON must be an object with a 'name'")
        return parsed
    if not _ARCH_NAME.match(text):
        raise BadInputError(
            f"arch: {text[:80]!r} is neither an arch name (like resnet18) nor a JSON object"
        )
    return {"name": text}


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _checkpoint_parts(obj: Any, given_arch: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """(arch, state_dict, meta) of a loaded checkpoint, with `given_arch` for a bare one."""
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj:
        # {"arch": "resnet18", ...} names a built-in arch with its defaults.
        own = parse_arch(obj["arch"]) if isinstance(obj["arch"], str) else obj["arch"]
        if given_arch is not None and given_arch != own:
            raise IncompatibleError(
                f"the checkpoint names arch {show_arch(own)} but the arch given with it "
                f"is {show_arch(given_arch)}; give no arch for a checkpoint that has one"
            )
        return own, obj["state_dict"], obj.get("meta") or {}
    if given_arch is not None and isinstance(obj, dict):
        if "state_dict" in obj and set(obj) <= {"state_dict", "meta"}:
            return given_arch, obj["state_dict"], obj.get("meta") or {}
        if _is_state_dict(obj) and obj:
            return given_arch, obj, {}
    if isinstance(obj, dict) and _is_state_dict(obj):
        raise ModelFormatError(
            f"the file is a bare state_dict ({len(obj)} tensors); {_BARE_STATE_DICT}"
        )
    got = (
        f"a dict with keys {sorted(map(str, obj))[:8]}"
        if isinstance(obj, dict)
        else type(obj).__name__
    )
    raise ModelFormatError(
        f"a torch checkpoint must be a dict with 'arch' and 'state_dict' (or a bare state_dict "
        f"with an arch given), got {got}; {_BARE_STATE_DICT}"
    )


def show_arch(arch: Any) -> str:
    """An arch for an error message: its name, or its repr clipped."""
    if isinstance(arch, dict) and isinstance(arch.get("name"), str) and arch["name"] != "tree":
        return repr(arch["name"])
    text = repr(arch)
    return text if len(text) <= 60 else text[:57] + "..."


def _load_torch(
    data: bytes, *, trust_pickle: bool, given_arch: dict[str, Any] | None = None
) -> ModelArtifact:
    from torch import nn

    from modules.storage.architectures import build_model_with_state

    obj = _torch_load(data, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        if not trust_pickle:
            raise UnsafeModelError(_NOT_WEIGHTS_ONLY)
        return _trusted_module_artifact(obj)
    if isinstance(obj, dict) and "format" in obj and obj["format"] != TORCH_FORMAT:
        raise ModelFormatError(
            f"unsupported checkpoint format {obj['format']!r}; expected {TORCH_FORMAT!r}"
        )
    arch, state, meta = _checkpoint_parts(obj, given_arch)
    if not isinstance(arch, dict):
        raise ModelFormatError(f"checkpoint 'arch' must be a dict, got {type(arch).__name__}")
    if not isinstance(meta, dict):
        raise ModelFormatError(f"checkpoint 'meta' must be a dict, got {type(meta).__name__}")
    if not _is_state_dict(state):
        raise ModelFormatError("checkpoint 'state_dict' must map parameter names to tensors")
    # The keys and shapes are checked against a meta-device build before anything is
    # allocated; the model then holds the checkpoint's own tensors.
    try:
        model = build_model_with_state(arch, state)
    except IncompatibleError as exc:
        raise ModelFormatError(str(exc)) from exc
    except BadInputError as exc:
        raise ModelFormatError(f"arch {show_arch(arch)} is invalid: {exc}") from exc
    model.eval()
    meta = {**meta, **torch_io_dims(model), "arch": arch}
    if arch.get("name") != "tree" and "zoo_arch" not in meta:
        meta["zoo_arch"] = arch
    return ModelArtifact("torch", model, meta)


def _load_pt2(data: bytes) -> ModelArtifact:
    from modules.storage.pt2 import load_pt2

    module, meta = load_pt2(data)
    return ModelArtifact("torch", module, meta)


def _save_pt2(artifact: ModelArtifact) -> bytes:
    from torch import nn

    from modules.storage.pt2 import save_pt2

    if not isinstance(artifact.obj, nn.Module):
        raise BadInputError(
            f"a torch artifact must hold an nn.Module, got {type(artifact.obj).__name__}"
        )
    meta = {k: v for k, v in artifact.meta.items() if k not in ("arch", "trusted_pickle")}
    return save_pt2(artifact.obj, _plain_meta(meta))


# --- scikit-learn --------------------------------------------------------------------------------


def _sklearn_meta(estimator: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if isinstance(getattr(estimator, "n_features_in_", None), int):
        meta["in_features"] = estimator.n_features_in_
    classes = getattr(estimator, "classes_", None)
    if classes is not None and hasattr(classes, "__len__"):
        meta["num_classes"] = len(classes)
    return meta


def _save_sklearn(artifact: ModelArtifact) -> bytes:
    import skops.io as sio

    try:
        return bytes(sio.dumps(artifact.obj))
    except Exception as exc:  # skops raises assorted types for unsupported objects
        raise BadInputError(
            f"cannot save {type(artifact.obj).__name__} with skops: {type(exc).__name__}: {exc}"
        ) from exc


def _load_sklearn(data: bytes) -> ModelArtifact:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # a broken schema or member raises whatever the parser hits
        raise ModelFormatError(f"not a readable skops file: {type(exc).__name__}: {exc}") from exc
    refused = sorted(set(untrusted) - TRUSTED_SKLEARN_TYPES)
    if refused:
        raise UnsafeModelError(
            f"skops file uses types outside the trusted list: {', '.join(refused)}"
        )
    try:
        estimator = sio.loads(data, trusted=list(untrusted))
    except Exception as exc:  # same: any failure here is a corrupt or incompatible file
        raise ModelFormatError(
            f"could not load the skops file: {type(exc).__name__}: {exc}"
        ) from exc
    return ModelArtifact("sklearn", estimator, _sklearn_meta(estimator))


# --- ONNX ----------------------------------------------------------------------------------------


def _onnx_walk(model: onnx.ModelProto) -> tuple[list[onnx.GraphProto], list[onnx.NodeProto]]:
    """Every graph (main, subgraphs) and every node (graphs and local functions) in a model."""
    graphs: list[onnx.GraphProto] = []
    nodes: list[onnx.NodeProto] = []
    pending_graphs = [model.graph]
    pending_nodes = [node for function in model.functions for node in function.node]
    while pending_graphs or pending_nodes:
        if pending_graphs:
            graph = pending_graphs.pop()
            graphs.append(graph)
            pending_nodes.extend(graph.node)
            continue
        node = pending_nodes.pop()
        nodes.append(node)
        for attr in node.attribute:
            if attr.HasField("g"):
                pending_graphs.append(attr.g)
            pending_graphs.extend(attr.graphs)
    return graphs, nodes


def _onnx_tensors(graphs: list[onnx.GraphProto], nodes: list[onnx.NodeProto]) -> list[Any]:
    tensors: list[Any] = []
    for graph in graphs:
        tensors.extend(graph.initializer)
        for sparse in graph.sparse_initializer:
            tensors += [sparse.values, sparse.indices]
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            sparse_tensors = [*attr.sparse_tensors]
            if attr.HasField("sparse_tensor"):
                sparse_tensors.append(attr.sparse_tensor)
            for sparse in sparse_tensors:
                tensors += [sparse.values, sparse.indices]
    return tensors


def _check_onnx(model: onnx.ModelProto) -> None:
    import onnx

    graphs, nodes = _onnx_walk(model)
    for tensor in _onnx_tensors(graphs, nodes):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise UnsafeModelError(
                f"ONNX tensor {tensor.name!r} refers to external data at {location!r}; "
                "external data is never loaded"
            )
    domains = {opset.domain for opset in model.opset_import}
    domains |= {node.domain for node in nodes}
    domains |= {function.domain for function in model.functions}
    custom = sorted(domains - ALLOWED_ONNX_DOMAINS)
    if custom:
        raise UnsafeModelError(
            f"ONNX model uses custom operator domain(s) {custom}; accepted domains: "
            f"{sorted(ALLOWED_ONNX_DOMAINS)}"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError and the checker's other failures alike
        raise ModelFormatError(f"ONNX model failed onnx.checker: {exc}") from exc


def _onnx_tagged_meta(model: onnx.ModelProto) -> dict[str, Any]:
    # What modules.deployment.onnx_export writes to metadata_props (`mcaas.*`), read back as
    # plain values; anything else a file claims there is ignored.
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith("mcaas.")}
    meta: dict[str, Any] = {}
    if props.get("mcaas.source_framework") in ("torch", "sklearn"):
        meta["source_framework"] = props["mcaas.source_framework"]
    if props.get("mcaas.num_classes", "").isdigit():
        meta["num_classes"] = int(props["mcaas.num_classes"])
    if props.get("mcaas.precision") in ("float32", "float64"):
        meta["precision"] = props["mcaas.precision"]
    quantized = props.get("mcaas.quantized", "")
    if quantized and len(quantized) <= 32 and quantized.replace("-", "").isalnum():
        meta["quantized"] = quantized
    return meta


def _onnx_meta(model: onnx.ModelProto) -> dict[str, Any]:
    from modules.storage.inputs import is_standard, onnx_inputs

    specs = onnx_inputs(model)
    tagged = _onnx_tagged_meta(model)
    # A feature count only means something for one float (batch, n_features) input; other
    # graphs (token ids, several inputs) are fed from an inputs file instead.
    shape = specs[0].shape if specs and is_standard(specs) else None
    if shape and isinstance(shape[-1], int) and shape[-1] > 0:
        return {**tagged, "in_features": shape[-1]}
    return tagged


def _load_onnx(data: bytes) -> ModelArtifact:
    model = _parse_onnx(data)
    if model is None:
        raise ModelFormatError("not a valid ONNX model (truncated or corrupt protobuf)")
    _check_onnx(model)
    return ModelArtifact("onnx", model, _onnx_meta(model))


def _save_onnx(artifact: ModelArtifact) -> bytes:
    import onnx

    if not isinstance(artifact.obj, onnx.ModelProto):
        raise BadInputError(
            f"an onnx artifact must hold an onnx.ModelProto, got {type(artifact.obj).__name__}"
        )
    return bytes(artifact.obj.SerializeToString())


# --- public API ----------------------------------------------------------------------------------


def save_model(artifact: ModelArtifact) -> bytes:
    """Serialise a model artifact into the bytes `load_model` reads back."""
    if artifact.framework == "torch" and artifact.meta.get("format") == "pt2":
        data = _save_pt2(artifact)
    elif artifact.framework == "torch":
        data = _save_torch(artifact)
    elif artifact.framework == "sklearn":
        data = _save_sklearn(artifact)
    elif artifact.framework == "onnx":
        data = _save_onnx(artifact)
    else:
        raise BadInputError(f"unknown model framework {artifact.framework!r}")
    if len(data) > MAX_MODEL_BYTES:
        raise BadInputError(
            f"the serialised model is {len(data):,} bytes, over the limit of {MAX_MODEL_BYTES:,}"
        )
    return data


def load_model(
    data: bytes,
    *,
    filename: str | None = None,
    trust_pickle: bool = False,
    arch: Any = None,
) -> ModelArtifact:
    """Load untrusted model bytes safely; `trust_pickle` (local CLI only) admits full nn.Modules.

    `arch` (a name like 'resnet18', a JSON object text or a dict) is the architecture of a
    bare state_dict file; it is refused for any other kind of file.
    """
    given_arch = parse_arch(arch)
    kind = _content_kind(data)
    if kind == "torch":
        _scan_pickles(data, trust_pickle=trust_pickle)
    _check_suffix(kind, filename)
    if given_arch is not None and kind != "torch":
        raise BadInputError(
            f"an arch is only given with a torch state_dict file; this is {_KIND_WORDS[kind]}"
        )
    if kind == "torch":
        return _load_torch(data, trust_pickle=trust_pickle, given_arch=given_arch)
    if kind == "pt2":
        return _load_pt2(data)
    if kind == "sklearn":
        return _load_sklearn(data)
    return _load_onnx(data)


def load_model_file(path: Path, *, trust_pickle: bool = False, arch: Any = None) -> ModelArtifact:
    """Load a model file from disk; see `load_model`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ModelFormatError(f"model file {path} does not exist") from exc
    except OSError as exc:
        raise ModelFormatError(f"cannot read model file {path}: {exc}") from exc
    if not path.is_file():
        raise ModelFormatError(f"model file {path} is not a regular file")
    if size > MAX_MODEL_BYTES:
        raise ModelFormatError(
            f"model file {path} is {size:,} bytes, over the limit of {MAX_MODEL_BYTES:,}"
        )
    try:
        return load_model(
            path.read_bytes(), filename=path.name, trust_pickle=trust_pickle, arch=arch
        )
    except BadInputError as exc:
        # Same error type, but the message names the file the user gave us.
        raise type(exc)(f"model file {path.name}: {exc}") from None
