"""The script CLI generated from a step's params model: flags, types, help, --params, aliases."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from modules.core.registry import list_steps
from modules.errors import BadInputError
from modules.pipeline import script
from modules.pipeline.script import (
    FileOption,
    ScriptOptions,
    add_params_options,
    flag_of,
    step_parser,
)


class Toy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fine_tune_epochs: int = Field(default=5, ge=0, description="Epochs.")
    rate: float = Field(default=0.5, description="A share (in %).")
    name: str | None = Field(default=None, description="A name.")
    conv: bool = Field(default=False, description="Also convs.")
    mode: Literal["fast", "slow"] = Field(default="fast", description="How.")
    sizes: list[int] = Field(default=[1, 64], description="Batch sizes.")
    tags: tuple[str, ...] = Field(default=(), description="Tags.")
    values: list[Any] = Field(default_factory=list, description="Anything.")
    layers: dict[str, Any] = Field(default_factory=dict, description="Per layer.")


def toy_parser(options: ScriptOptions | None = None) -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser()
    return parser, add_params_options(parser, Toy, options)


def read(argv: list[str], options: ScriptOptions | None = None) -> dict[str, Any]:
    parser, reader = toy_parser(options)
    return reader(parser.parse_args(argv), Path("unused"))


def test_flag_names_come_from_field_names() -> None:
    assert flag_of("fine_tune_epochs") == "--fine-tune-epochs"
    parser, _ = toy_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--fine-tune-epochs", "--rate", "--conv", "--no-conv", "--sizes", "--layers"} <= flags


def test_only_given_flags_are_params_and_types_follow_annotations() -> None:
    assert read([]) == {}
    got = read(["--fine-tune-epochs", "3", "--rate", "0.25", "--name", "x"])
    assert got == {"fine_tune_epochs": 3, "rate": 0.25, "name": "x"}
    assert Toy(**got).fine_tune_epochs == 3


def test_a_bad_number_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        read(["--fine-tune-epochs", "many"])
    assert caught.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_bool_fields_have_yes_and_no_flags() -> None:
    assert read(["--conv"]) == {"conv": True}
    assert read(["--no-conv"]) == {"conv": False}


def test_literal_choices_are_shown_and_checked_by_the_params_model() -> None:
    parser, _ = toy_parser()
    assert "{fast,slow}" in parser.format_help()
    got = read(["--mode", "medium"])
    # Not an argparse error: the params model refuses it with the job-spec message.
    with pytest.raises(ValueError, match="mode"):
        Toy(**got)


def test_lists_take_commas_or_json() -> None:
    assert read(["--sizes", "1,8"]) == {"sizes": [1, 8]}
    assert read(["--sizes", "[2, 4]"]) == {"sizes": [2, 4]}
    assert read(["--tags", "a,b"]) == {"tags": ["a", "b"]}
    assert read(["--tags", ""]) == {"tags": []}
    assert read(["--values", "0.5,structured,true"]) == {"values": [0.5, "structured", True]}
    with pytest.raises(BadInputError, match="--sizes must be comma-separated integers"):
        read(["--sizes", "1,x"])
    with pytest.raises(BadInputError, match="--sizes is not valid JSON"):
        read(["--sizes", "[1,"])


def test_dict_fields_take_json_naming_the_option_on_error() -> None:
    assert read(["--layers", '{"0": "skip"}']) == {"layers": {"0": "skip"}}
    with pytest.raises(BadInputError, match="--layers is not valid JSON"):
        read(["--layers", "{nope"])


def test_help_has_description_and_default_and_survives_percent() -> None:
    parser, _ = toy_parser()
    text = " ".join(parser.format_help().split())
    assert "Epochs. (default: 5)" in text
    assert "A share (in %). (default: 0.5)" in text
    assert "Batch sizes. Comma-separated or a JSON list. (default: [1, 64])" in text
    assert "A name. (default: none)" in text


def test_aliases_files_and_implied_fields() -> None:
    staged: list[tuple[Path, Path, bool]] = []

    def stage(workspace: Path, path: Path, trust_pickle: bool) -> str:
        staged.append((workspace, path, trust_pickle))
        return "key-1"

    options = ScriptOptions(
        aliases={"rate": ["--share"]},
        files={"name": FileOption("--name-file", stage, "A file.")},
        implies={"rate": {"mode": "slow"}},
    )
    parser, reader = toy_parser(options)
    assert "--name" not in {s for a in parser._actions for s in a.option_strings}
    args = parser.parse_args(["--share", "0.1", "--name-file", "f.bin"])
    assert reader(args, Path("ws")) == {"rate": 0.1, "mode": "slow", "name": "key-1"}
    assert staged == [(Path("ws"), Path("f.bin"), False)]
    args = parser.parse_args(["--share", "0.1", "--mode", "fast"])
    assert reader(args, Path("ws")) == {"rate": 0.1, "mode": "fast"}


def test_a_field_named_like_a_script_option_is_refused() -> None:
    class Clash(BaseModel):
        seed: int = Field(default=0, description="Seed.")

    with pytest.raises(ValueError, match="Clash.seed clashes"):
        add_params_options(argparse.ArgumentParser(), Clash)


def test_params_json_sets_any_field_and_flags_win() -> None:
    parser, reader = step_parser("measure")
    argv = ["--input-model", "m.pt", "--params", '{"runs": 9, "warmup": 1}', "--runs", "3"]
    assert reader(parser.parse_args(argv), Path("ws")) == {"runs": 3, "warmup": 1}
    with pytest.raises(BadInputError, match="--params must be a JSON object"):
        reader(parser.parse_args(["--input-model", "m.pt", "--params", "[1]"]), Path("ws"))


def script_of(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[argparse.ArgumentParser, Any]:
    """The parser and reader a script's main() builds (caught by running it with --help)."""
    built: list[tuple[argparse.ArgumentParser, Any]] = []
    real = script.step_parser

    def recording(step: str, options: ScriptOptions | None = None) -> Any:
        built.append(real(step, options))
        return built[-1]

    monkeypatch.setattr(script, "step_parser", recording)
    with pytest.raises(SystemExit) as caught:
        importlib.import_module(module).main(["--help"])
    assert caught.value.code == 0 and "usage:" in capsys.readouterr().out
    assert len(built) == 1
    return built[0]


def test_seed_contract_flag_names(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser, reader = script_of("modules.compression.distill", monkeypatch, capsys)
    args = parser.parse_args(["--teacher", "t.pt", "--output", "o.pt", "--temperature", "2"])
    assert (args.input_model, args.output_model) == (Path("t.pt"), Path("o.pt"))
    assert reader(args, Path("ws")) == {"temperature": 2.0}
    assert "--student" in parser.format_help() and "--student-arch" in parser.format_help()

    parser, _ = script_of("modules.compression.quantize_dynamic", monkeypatch, capsys)
    args = parser.parse_args(["in.pt", "out.pt"])
    assert (args.input_model, args.output_model) == (Path("in.pt"), Path("out.pt"))

    parser, reader = script_of("modules.compression.lowrank", monkeypatch, capsys)
    args = parser.parse_args(["--input-model", "m.pt", "--ratio", "0.5"])
    assert reader(args, Path("ws")) == {"ratio": 0.5, "rank_rule": "ratio"}

    parser, reader = script_of("modules.compression.prune_structured", monkeypatch, capsys)
    args = parser.parse_args(["--input-model", "m.pt", "--amount", "0.3"])
    assert reader(args, Path("ws")) == {"amount": 0.3}

    parser, reader = script_of("modules.search.auto", monkeypatch, capsys)
    args = parser.parse_args(["--input-model", "m.pt", "--max-time", "5"])
    assert reader(args, Path("ws")) == {"max_time_s": 5.0}


def assert_every_option_has_help(parser: argparse.ArgumentParser, where: str) -> None:
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{where}: {action.option_strings} has no help"
    parser.format_help()  # a stray % in a description would raise here


@pytest.mark.parametrize("name", [s.name for s in list_steps()])
def test_every_registered_steps_script_has_help_on_every_option(name: str) -> None:
    parser, _ = step_parser(name)
    assert_every_option_has_help(parser, name)


SCRIPTS = [
    "modules.compression.distill",
    "modules.compression.feature_prune",
    "modules.compression.forest_prune",
    "modules.compression.knn_prototypes",
    "modules.compression.lowrank",
    "modules.compression.measure_inference_time",
    "modules.compression.precision",
    "modules.compression.prune_structured",
    "modules.compression.quantize_dynamic",
    "modules.deployment.float16",
    "modules.deployment.onnx_export",
    "modules.deployment.onnx_quantize",
    "modules.deployment.quantize_static",
    "modules.evaluation.hardware_sim",
    "modules.evaluation.profile",
    "modules.search.auto",
    "modules.search.sensitivity",
    "modules.search.sweep",
]


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_script_has_help_on_every_option(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser, _ = script_of(module, monkeypatch, capsys)
    assert_every_option_has_help(parser, module)


def test_the_parity_script_reads_the_gate_and_the_export_params(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from modules.deployment import parity

    parsers: list[argparse.ArgumentParser] = []
    readers: list[Any] = []
    real_base, real_add = script.base_parser, script.add_params_options

    def base(*args: Any, **kwargs: Any) -> argparse.ArgumentParser:
        parsers.append(real_base(*args, **kwargs))
        return parsers[-1]

    def add(*args: Any, **kwargs: Any) -> Any:
        readers.append(real_add(*args, **kwargs))
        return readers[-1]

    monkeypatch.setattr(script, "base_parser", base)
    monkeypatch.setattr(script, "add_params_options", add)
    with pytest.raises(SystemExit):
        parity.main(["--help"])
    assert "--max-prob-diff" in capsys.readouterr().out
    (parser,), (read_gate, read_export) = parsers, readers
    assert_every_option_has_help(parser, "parity")
    argv = ["--input-model", "m.pt", "--min-agreement", "0.9", "--opset", "18"]
    args = parser.parse_args(argv)
    assert read_gate(args, Path("ws")) == {"min_agreement": 0.9}
    assert read_export(args, Path("ws")) == {"opset": 18}
