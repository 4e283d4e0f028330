"""The shared body of every per-technique script: parse, run one step via run_step, print JSON.

`python -m modules.compression.<name> ...` calls `script_main`; on our errors it prints
`error: ...` to stderr and exits 2, and no output file is written. Started with no
arguments and MODEL_S3_KEY set, a script runs its step in ECS env-var mode instead
(see modules/pipeline/ecs.py).

A script's options are generated from its step's params model (`add_params_options`), so
a field is written once: `fine_tune_epochs` becomes `--fine-tune-epochs`, typed from its
annotation, with its description and default as the help. `--params JSON` sets any field
(dict and nested fields have no other flag form); flags given next to it win.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from modules.core.jobspec import DEFAULT_PROFILE
from modules.errors import McaasError

# (workspace root, local file, trust_pickle) -> the key or id the step's field takes.
Stage = Callable[[Path, Path, bool], str]
ParamsReader = Callable[[argparse.Namespace, Path], dict[str, Any]]

# Options every script has; a params field with one of these names would be shadowed.
BASE_DESTS = frozenset(
    {
        "input_model",
        "output_model",
        "input_arch",
        "dataset",
        "profile",
        "seed",
        "trust_pickle",
        "params",
    }
)
ARCH_HELP = (
    "Architecture of a bare state_dict input: a built-in name (resnet18, resnet34, resnet50, "
    'mobilenet_v2, vgg11, vgg16, ...) or a JSON arch like \'{"name":"resnet18","num_classes":10}\'.'
)
_SCALARS: dict[Any, type] = {int: int, float: float, str: str}


@dataclass(frozen=True)
class FileOption:
    """A field set from a local file: the script stages the file and passes its key or id."""

    flag: str
    stage: Stage
    help: str


@dataclass(frozen=True)
class ScriptOptions:
    """How one step's script differs from the generated default (seed-contract flag names).

    aliases: field (or input_model / output_model) -> extra flags naming the same option.
    files: field -> a file option that replaces the field's own flag.
    implies: field -> fields it also sets when given on the command line (unless given too).
    """

    aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)
    files: Mapping[str, FileOption] = field(default_factory=dict)
    implies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    positional_io: bool = False


def base_parser(
    description: str,
    *,
    positional_io: bool = False,
    aliases: Mapping[str, Sequence[str]] | None = None,
    arch_flag: bool = True,
) -> argparse.ArgumentParser:
    """A parser with the options every technique script shares.

    `arch_flag=False` leaves out `--arch` (the input's arch) for a step whose own params
    have an `arch` field.
    """
    aliases = aliases or {}
    parser = argparse.ArgumentParser(description=description)
    if positional_io:
        parser.add_argument("input_model", type=Path, help="Input model file.")
        parser.add_argument("output_model", type=Path, help="Where to write the result.")
    else:
        in_flags = ["--input-model", *aliases.get("input_model", ())]
        out_flags = ["--output-model", *aliases.get("output_model", ())]
        parser.add_argument(
            *in_flags, dest="input_model", type=Path, required=True, help="Input model file."
        )
        parser.add_argument(
            *out_flags, dest="output_model", type=Path, help="Where to write the result."
        )
    if arch_flag:
        parser.add_argument("--arch", dest="input_arch", metavar="ARCH", help=ARCH_HELP)
    parser.add_argument("--dataset", default="digits", help="Built-in name, .npz or IDX dir.")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="Hardware profile name.")
    parser.add_argument("--seed", type=int, default=0, help="Seed.")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="Allow full pickled torch modules (runs code from the file: trusted files only).",
    )
    return parser


def flag_of(name: str) -> str:
    """`fine_tune_epochs` -> `--fine-tune-epochs`."""
    return "--" + name.replace("_", "-")


def _strip_none(annotation: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _list_item(annotation: Any) -> Any | None:
    """The item type of list[X] / tuple[X, ...]; None when the annotation is not one."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and len(args) == 1:
        return _strip_annotated(args[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _strip_annotated(args[0])
    return None


def _strip_annotated(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "default: none"
    if isinstance(value, bool):
        return f"default: {'yes' if value else 'no'}"
    if isinstance(value, list | tuple | dict):
        return f"default: {json.dumps(list(value) if isinstance(value, tuple) else value)}"
    return f"default: {value}"


def _help(info: FieldInfo, extra: str = "") -> str:
    text = (info.description or "").strip()
    text = f"{text}{' ' if text else ''}{extra}({_default_text(info)})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _parse_list(text: str, item: Any, *, option: str) -> list[Any]:
    """A JSON list, or comma-separated values converted to the item type ('' is [])."""
    from modules.errors import BadInputError

    stripped = text.strip()
    if stripped.startswith("["):
        values = parse_json_arg(stripped, option=option)
        if not isinstance(values, list):
            raise BadInputError(f"{option} must be a list, got {text!r}")
        return values
    parts = [p.strip() for p in stripped.split(",") if p.strip()]
    convert = _SCALARS.get(item)
    try:
        if convert is not None:
            return [convert(p) for p in parts]
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(item, "values")
        raise BadInputError(f"{option} must be comma-separated {kind}, got {text!r}") from None
    out: list[Any] = []
    for part in parts:
        try:
            out.append(json.loads(part))
        except json.JSONDecodeError:
            out.append(part)  # a bare word such as a method name
    return out


def _add_field(
    parser: argparse.ArgumentParser, name: str, info: FieldInfo, flags: list[str]
) -> Callable[[Any], Any]:
    """Add the option of one field; returns how its parsed value becomes the param value."""
    annotation = _strip_annotated(_strip_none(info.annotation))
    dest = f"param__{name}"
    common: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    if annotation is bool:
        parser.add_argument(
            *flags, action=argparse.BooleanOptionalAction, help=_help(info), **common
        )
        return lambda v: v
    if typing.get_origin(annotation) is Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        # No argparse `choices`: the params model checks the value, so a bad one is refused
        # with the same message (and exit 2 with `error:`) as in a job spec.
        parser.add_argument(
            *flags,
            metavar="{" + ",".join(choices) + "}",
            help=_help(info),
            **common,
        )
        return lambda v: v
    if annotation in _SCALARS:
        scalar = _SCALARS[annotation]
        parser.add_argument(
            *flags, type=scalar, metavar=scalar.__name__.upper(), help=_help(info), **common
        )
        return lambda v: v
    item = _list_item(annotation)
    if item is not None and (item in _SCALARS or item is Any):
        option = flags[0]
        parser.add_argument(
            *flags,
            metavar="A,B,...",
            help=_help(info, "Comma-separated or a JSON list. "),
            **common,
        )
        return lambda v: _parse_list(v, item, option=option)
    option = flags[0]
    parser.add_argument(*flags, metavar="JSON", help=_help(info), **common)
    return lambda v: parse_json_arg(v, option=option)


def add_params_options(
    parser: argparse.ArgumentParser,
    params: type[BaseModel],
    options: ScriptOptions | None = None,
    *,
    only: Sequence[str] | None = None,
) -> ParamsReader:
    """Add one option per field of `params`; returns a reader of the given ones as a dict.

    The reader takes the parsed namespace and the workspace root file options stage into.
    """
    options = options or ScriptOptions()
    readers: dict[str, Callable[[Any], Any]] = {}
    files: dict[str, FileOption] = {}
    # The model's own fields first, as written; then those of its mixins (FineTuneFields).
    own = [n for n in vars(params).get("__annotations__", {}) if n in params.model_fields]
    names = [*own, *(n for n in params.model_fields if n not in own)]
    for name in names:
        info = params.model_fields[name]
        if only is not None and name not in only:
            continue
        if name in BASE_DESTS:
            raise ValueError(f"{params.__name__}.{name} clashes with a script option")
        if name in options.files:
            file_option = options.files[name]
            parser.add_argument(
                file_option.flag,
                dest=f"param__{name}",
                type=Path,
                default=argparse.SUPPRESS,
                metavar="FILE",
                help=file_option.help,
            )
            files[name] = file_option
            continue
        flags = [flag_of(name), *options.aliases.get(name, ())]
        readers[name] = _add_field(parser, name, info, flags)

    def read(args: argparse.Namespace, workspace: Path) -> dict[str, Any]:
        given = vars(args)
        out: dict[str, Any] = {}
        for name, convert in readers.items():
            if f"param__{name}" in given:
                out[name] = convert(given[f"param__{name}"])
        for name, file_option in files.items():
            if f"param__{name}" in given:
                out[name] = file_option.stage(
                    workspace, given[f"param__{name}"], bool(given.get("trust_pickle"))
                )
        for name, implied in options.implies.items():
            if name in out:
                out = {**implied, **out}
        return out

    return read


def step_parser(
    step: str, options: ScriptOptions | None = None
) -> tuple[argparse.ArgumentParser, ParamsReader]:
    """The parser of `step`'s script, generated from its params model, and its reader.

    The reader merges `--params JSON` under the flags given.
    """
    from modules.core.registry import get_step

    options = options or ScriptOptions()
    registered = get_step(step)
    parser = base_parser(
        registered.summary or f"Run the {step} step.",
        positional_io=options.positional_io,
        aliases=options.aliases,
        arch_flag="arch" not in registered.params.model_fields,
    )
    parser.add_argument(
        "--params",
        metavar="JSON",
        help="A JSON object of any of the step's params (flags given as well win).",
    )
    read_fields = add_params_options(parser, registered.params, options)

    def read(args: argparse.Namespace, workspace: Path) -> dict[str, Any]:
        from modules.errors import BadInputError

        base = parse_json_arg(args.params, option="--params") or {}
        if not isinstance(base, dict):
            raise BadInputError(f"--params must be a JSON object, got {args.params!r}")
        return {**base, **read_fields(args, workspace)}

    return parser, read


def script_main(
    step: str,
    argv: Sequence[str] | None = None,
    options: ScriptOptions | None = None,
) -> int:
    """Parse argv, run `step` on the input model, print one JSON line; 2 on bad input."""
    if argv is None and not sys.argv[1:] and os.environ.get("MODEL_S3_KEY"):
        from modules.pipeline.ecs import ecs_main

        return ecs_main(step)
    from modules.pipeline.local import run_single_step

    parser, read_params = step_parser(step, options)
    args = parser.parse_args(argv)
    output = getattr(args, "output_model", None)
    # Staged files (a student model, an inputs file) go into the store the step reads.
    with tempfile.TemporaryDirectory(prefix=f"mcaas-{step}-") as tmp:
        workspace = Path(tmp)
        try:
            record = run_single_step(
                step,
                read_params(args, workspace),
                input_path=args.input_model,
                input_arch=getattr(args, "input_arch", None),
                output_path=output,
                dataset=args.dataset,
                profile=args.profile,
                seed=args.seed,
                trust_pickle=args.trust_pickle,
                workspace=workspace,
            )
        except McaasError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    line = {
        "step": step,
        "output_model": str(output) if output else None,
        "output_size": record.output_size,
        "input_size": record.input_size,
        "verdict": record.verdict,
        "metrics": record.metrics,
    }
    print(json.dumps(line, default=str))
    return 0


def parse_json_arg(value: str | None, *, option: str) -> Any:
    """A JSON-valued option, with an error naming the option when it does not parse."""
    from modules.errors import BadInputError

    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{option} is not valid JSON: {exc}") from None
