"""CLI around the registered `measure` step: size, accuracy and latency of one model file.

Latency is `--warmup` untimed runs then `--runs` timed runs per batch size, reported as
median, mean, std and a Student-t 95% CI (see modules/evaluation/measure.py). No model is
written: the step passes its input through.

CLI: python -m modules.compression.measure_inference_time --input-model m.pt
     [--batch-sizes 1,64] [--runs 30] [--warmup 5] [--dataset digits]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from modules.errors import BadInputError
from modules.pipeline.script import base_parser, script_main


def parse_batch_sizes(text: str) -> list[int]:
    """'1,64' -> [1, 64]; a BadInputError names the option when it does not parse."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInputError(
            f"--batch-sizes must be comma-separated integers, got {text!r}"
        ) from None
    if not sizes:
        raise BadInputError("--batch-sizes needs at least one batch size")
    return sizes


def _to_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"batch_sizes": parse_batch_sizes(args.batch_sizes)}
    if args.runs is not None:
        params["runs"] = args.runs
    if args.warmup is not None:
        params["warmup"] = args.warmup
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the `measure` step on one model file and print one JSON line of metrics."""
    parser = base_parser("Measure a model's size, accuracy and latency (with 95% CI).")
    parser.add_argument("--batch-sizes", default="1,64", help="Comma-separated, e.g. 1,64.")
    parser.add_argument("--runs", type=int, help="Timed runs per batch size (default 30).")
    parser.add_argument("--warmup", type=int, help="Untimed warm-up runs (default 5).")
    return script_main("measure", parser, _to_params, argv)


if __name__ == "__main__":
    raise SystemExit(main())
