"""CLI around the registered `measure` step: size, accuracy and latency of one model file.

Latency is `--warmup` untimed runs then `--runs` timed runs per batch size, reported as
median, mean, std and a Student-t 95% CI (see modules/evaluation/measure.py). No model is
written: the step passes its input through.

CLI: python -m modules.compression.measure_inference_time --input-model m.pt
     [--batch-sizes 1,64] [--runs 30] [--warmup 5] [--dataset digits] [--inputs rows.npz]

--inputs: a .npz with one array per model input (checked like an upload), for models the
dataset cannot feed; it times them on those rows and reports no accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the `measure` step on one model file; print one JSON line."""
    from modules.pipeline.script import FileOption, ScriptOptions, script_main

    inputs = FileOption("--inputs", _stage_inputs, ".npz with one array per model input.")
    return script_main("measure", argv, ScriptOptions(files={"inputs": inputs}))


def _stage_inputs(workspace: Path, path: Path, trust_pickle: bool) -> str:
    from modules.storage.inputs import stage_inputs_file

    return stage_inputs_file(workspace, path)


if __name__ == "__main__":
    raise SystemExit(main())
