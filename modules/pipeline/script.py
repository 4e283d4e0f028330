"""The shared body of every per-technique script: parse, run one step via run_step, print JSON.

`python -m modules.compression.<name> ...` calls `script_main`; on our errors it prints
`error: ...` to stderr and exits 2, and no output file is written. Started with no
arguments and MODEL_S3_KEY set, a script runs its step in ECS env-var mode instead
(see modules/pipeline/ecs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modules.errors import McaasError

ParamsFn = Callable[[argparse.Namespace], dict[str, Any]]


def base_parser(description: str, *, positional_io: bool = False) -> argparse.ArgumentParser:
    """A parser with the options every technique script shares."""
    parser = argparse.ArgumentParser(description=description)
    if positional_io:
        parser.add_argument("input_model", type=Path, help="Input model file.")
        parser.add_argument("output_model", type=Path, help="Where to write the result.")
    else:
        parser.add_argument("--input-model", type=Path, required=True, help="Input model file.")
        parser.add_argument("--output-model", type=Path, help="Where to write the result.")
    parser.add_argument("--dataset", default="digits", help="Built-in name, .npz or IDX dir.")
    parser.add_argument("--profile", default="edge-8mb", help="Hardware profile name.")
    parser.add_argument("--seed", type=int, default=0, help="Seed.")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="Allow full pickled torch modules (runs code from the file: trusted files only).",
    )
    return parser


def script_main(
    step: str,
    parser: argparse.ArgumentParser,
    to_params: ParamsFn,
    argv: Sequence[str] | None = None,
    *,
    workspace: Path | None = None,
) -> int:
    """Parse argv, run `step` on the input model, print one JSON line; 2 on bad input.

    workspace: a LocalWorkspace root the script already put extra inputs in (distill's
    student model); by default run_single_step uses a fresh temporary one.
    """
    if argv is None and not sys.argv[1:] and os.environ.get("MODEL_S3_KEY"):
        from modules.pipeline.ecs import ecs_main

        return ecs_main(step)
    from modules.pipeline.local import run_single_step

    args = parser.parse_args(argv)
    try:
        params = to_params(args)
        output = getattr(args, "output_model", None)
        record = run_single_step(
            step,
            params,
            input_path=args.input_model,
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
        "output_size": record.get("output_size"),
        "input_size": record.get("input_size"),
        "verdict": record.get("verdict"),
        "metrics": record.get("metrics"),
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
