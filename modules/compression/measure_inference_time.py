"""CLI around the registered `measure` step: size, accuracy and latency of one model file.

Latency is `--warmup` untimed runs then `--runs` timed runs per batch size, reported as
median, mean, std and a Student-t 95% CI (see modules/evaluation/measure.py). No model is
written: the step passes its input through.

CLI: python -m modules.compression.measure_inference_time --input-model m.pt
     [--batch-sizes 1,64] [--runs 30] [--warmup 5] [--dataset digits]
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the `measure` step on one model file; print one JSON line."""
    from modules.pipeline.script import script_main

    return script_main("measure", argv)


if __name__ == "__main__":
    raise SystemExit(main())
