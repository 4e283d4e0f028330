"""Benchmark the torch compression steps on digits; writes results/torch_compression.md.

Every row is a real job run in-process through run_pipeline (so through run_step and the
safe save/load path), ending with the `measure` step, once per seed. Each seed draws its
own train/test split and trains its own teacher (a 64-1024-1024-10 MLP, about 1.1M
parameters). Accuracy is the mean over seeds with a Student-t 95% CI; size is the stored
file. Latency: the measure step times each model right after it is made, when background
load may differ, so at the end of each seed every row's stored model is timed again,
interleaved in a shuffled order per round (ROUNDS x RUNS runs each); a row's latency is
the median over seeds of those per-seed medians, with the Student-t 95% CI of the per-seed
medians. Not a test: nothing here asserts on speed.

Run: .venv/bin/python benchmarks/torch_compression.py [--seeds 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules.core.jobspec import parse_job_spec  # noqa: E402
from modules.evaluation.inference import make_predictor  # noqa: E402  (after the sys.path fix)
from modules.evaluation.measure import batch_of, time_batches  # noqa: E402
from modules.evaluation.stats import summarize  # noqa: E402
from modules.pipeline.local import LocalWorkspace  # noqa: E402
from modules.pipeline.run import load_stored_model  # noqa: E402
from modules.storage.datasets import load_dataset  # noqa: E402

TEACHER = {"name": "mlp", "hidden": [1024, 1024]}
TEACHER_EPOCHS = 20
MEASURE = {"name": "measure", "params": {"batch_sizes": [1, 64], "warmup": 10, "runs": 50}}
ROUNDS, RUNS, WARMUP = 8, 25, 10
STUDENT = {"name": "mlp", "hidden": [256]}
KD = {"student_arch": STUDENT, "epochs": 40, "lr": 3e-3, "temperature": 4.0, "alpha": 0.7}

ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("fp32 teacher (64-1024-1024-10)", []),
    (
        "unstructured 90% (global) + fine-tune",
        [
            {
                "name": "prune_structured",
                "params": {
                    "method": "unstructured",
                    "amount": 0.9,
                    "scope": "global",
                    "finetune_epochs": 10,
                },
            }
        ],
    ),
    (
        "structured 50% + fine-tune",
        [
            {
                "name": "prune_structured",
                "params": {"method": "structured", "amount": 0.5, "finetune_epochs": 10},
            }
        ],
    ),
    (
        "gradual to 90% (Zhu & Gupta)",
        [
            {
                "name": "prune_structured",
                "params": {
                    "method": "gradual",
                    "amount": 0.9,
                    "scope": "global",
                    "prune_epochs": 10,
                    "finetune_epochs": 5,
                    "frequency": 10,
                },
            }
        ],
    ),
    ("KD student (64-256-10)", [{"name": "distill", "params": KD}]),
    ("dynamic int8", [{"name": "quantize_dynamic", "params": {"dtype": "int8"}}]),
    ("low-rank (energy 0.9) + fine-tune", [{"name": "lowrank", "params": {"energy": 0.9}}]),
    (
        "KD -> structured 50% -> int8",
        [
            {"name": "distill", "params": KD},
            {
                "name": "prune_structured",
                "params": {"method": "structured", "amount": 0.5, "finetune_epochs": 10},
            },
            {"name": "quantize_dynamic", "params": {"dtype": "int8"}},
        ],
    ),
]

# Why a target can be missed, printed next to a miss (the table shows the numbers).
MISS_REASONS: dict[str, str] = {
    "size ratio": "fixed per-file overhead (zip headers, the arch JSON, meta) and tensors "
    "that stay float32 (per-row scales, biases, unpruned input/output sides) weigh more "
    "the smaller the model gets",
    "accuracy drop": "the test split has 450 images, so one image is 0.22 pt; the "
    "fine-tuning budget is kept small so the benchmark stays under ~12 minutes",
    "b64 speedup": "latency is measured on a shared 2-core machine; small layers are "
    "dominated by per-call overhead rather than arithmetic",
}

# Targets from the issue: row -> (min size ratio, min b64 speedup, max accuracy drop in pt).
TARGETS: dict[str, tuple[float, float | None, float]] = {
    "dynamic int8": (3.8, None, 0.5),
    "structured 50% + fine-tune": (3.0, 1.5, 1.0),
    "KD -> structured 50% -> int8": (50.0, None, 1.5),
}


def run_seed(seed: int, root: Path) -> dict[str, dict[str, Any]]:
    """Every row's measure metrics (plus its compression step metrics) for one seed."""
    ws = LocalWorkspace(root / f"seed{seed}")
    teacher_job = parse_job_spec(
        {
            "job_id": f"teacher-s{seed}",
            "seed": seed,
            "steps": [
                {
                    "name": "train",
                    "params": {"model": "mlp", "arch": TEACHER, "epochs": TEACHER_EPOCHS},
                },
                MEASURE,
            ],
        }
    )
    result = ws.run(teacher_job)
    if result.status != "COMPLETED":
        raise SystemExit(f"teacher job failed: {result.reason}")
    teacher_key = result.records[0].output_key
    out: dict[str, dict[str, Any]] = {}
    for i, (label, steps) in enumerate(ROWS):
        start = time.perf_counter()
        if not steps:
            records = result.records
        else:
            job = parse_job_spec(
                {
                    "job_id": f"row{i}-s{seed}",
                    "model": teacher_key,
                    "seed": seed,
                    "steps": [*steps, MEASURE],
                }
            )
            done = ws.run(job)
            if done.status != "COMPLETED":
                raise SystemExit(f"{label} (seed {seed}) failed: {done.reason}")
            records = done.records
        out[label] = {
            "measure": records[-1].metrics,
            "steps": [r.metrics for r in records[:-1]],
            "key": records[-1].output_key,
        }
        print(
            f"seed {seed} {label}: acc {records[-1].metrics['accuracy']:.4f} "
            f"size {records[-1].metrics['size_bytes']:,} ({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    retime_interleaved(out, ws, seed=seed)
    return out


def retime_interleaved(rows: dict[str, dict[str, Any]], ws: LocalWorkspace, *, seed: int) -> None:
    """Time every row's stored model round-robin, so background load hits all rows alike."""
    data = load_dataset("digits", seed=seed)
    predictors = {
        label: make_predictor(load_stored_model(ws.store, row["key"]))
        for label, row in rows.items()
    }
    batches = {size: batch_of(data.X_test, size) for size in (1, 64)}
    samples: dict[str, dict[int, list[float]]] = {
        label: {size: [] for size in batches} for label in rows
    }
    order = list(predictors)
    shuffle = random.Random(seed)
    for round_ in range(ROUNDS):
        # A fresh order each round, so no row always follows the same neighbour.
        shuffle.shuffle(order)
        for label in order:
            for size, x in batches.items():
                warmup = WARMUP if round_ == 0 else 3
                _, raw = time_batches(predictors[label].scores, x, warmup=warmup, runs=RUNS)
                samples[label][size] += raw
    for label, row in rows.items():
        row["latency_ms"] = {
            f"b{size}": summarize(v, unit="ms") for size, v in samples[label].items()
        }


def _ms(stat: dict[str, Any]) -> str:
    return f"{stat['median']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"


def aggregate(per_seed: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One summary per row across seeds."""
    rows = []
    teacher = ROWS[0][0]
    for label, _ in ROWS:
        measures = [seed[label]["measure"] for seed in per_seed]
        teacher_measures = [seed[teacher]["measure"] for seed in per_seed]
        acc = summarize([100 * m["accuracy"] for m in measures])
        drop = summarize(
            [
                100 * (t["accuracy"] - m["accuracy"])
                for t, m in zip(teacher_measures, measures, strict=True)
            ]
        )
        size = summarize([m["size_bytes"] for m in measures])
        lat = {
            b: summarize([seed[label]["latency_ms"][b]["median"] for seed in per_seed])
            for b in ("b1", "b64")
        }
        prune = next(
            (s for s in per_seed[0][label]["steps"] if "size_csr_estimate_bytes" in s), None
        )
        rows.append(
            {
                "label": label,
                "steps": per_seed[0][label]["steps"],
                "acc": acc,
                "drop": drop,
                "size": size,
                "lat": lat,
                "sparse": prune,
                "sparsity": summarize([m["sparsity"] for m in measures]),
                "params": measures[0]["params"],
            }
        )
    base = rows[0]
    for row in rows:
        row["ratio"] = base["size"]["mean"] / row["size"]["mean"]
        row["speedup_b1"] = base["lat"]["b1"]["median"] / row["lat"]["b1"]["median"]
        row["speedup_b64"] = base["lat"]["b64"]["median"] / row["lat"]["b64"]["median"]
    return rows


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Met / missed for each target, with the numbers."""
    by_label = {r["label"]: r for r in rows}
    lines = []
    for label, (min_ratio, min_speedup, max_drop) in TARGETS.items():
        row = by_label[label]
        checks = [
            (f"size ratio {row['ratio']:.1f}x >= {min_ratio}x", row["ratio"] >= min_ratio),
            (
                f"accuracy drop {row['drop']['mean']:.2f} pt <= {max_drop} pt",
                row["drop"]["mean"] <= max_drop,
            ),
        ]
        if min_speedup is not None:
            checks.append(
                (
                    f"b64 speedup {row['speedup_b64']:.2f}x >= {min_speedup}x",
                    row["speedup_b64"] >= min_speedup,
                )
            )
        verdict = "met" if all(ok for _, ok in checks) else "MISSED"
        detail = "; ".join(f"{text} ({'ok' if ok else 'missed'})" for text, ok in checks)
        lines.append(f"- **{label}**: {verdict}: {detail}.")
        for text, ok in checks:
            if not ok:
                reason = next(v for k, v in MISS_REASONS.items() if text.startswith(k))
                lines.append(
                    f"  - why the {text.split(' ')[0]} {text.split(' ')[1]} is missed: {reason}."
                )
    return lines


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What each technique did on seed 0, from its step metrics."""
    lines = []
    for r in rows:
        for m in r["steps"]:
            if "kernel" in m:
                lines.append(
                    f"- {r['label']}: int8 kernel: {m['kernel']}; label agreement "
                    f"with its input {m['label_agreement']:.3f}."
                )
            if "widths" in m:
                lines.append(f"- {r['label']}: widths [before, after]: {m['widths']}.")
            if "layers" in m and "rank_rule" in m:
                ranks = ", ".join(
                    f"{x['layer']}: {x['rank']}/{x['full_rank']}"
                    + ("" if x["replaced"] else " (kept)")
                    for x in m["layers"]
                )
                lines.append(f"- {r['label']}: rank/full rank per Linear: {ranks}.")
            if "teacher" in m and "student" in m:
                lines.append(
                    f"- {r['label']}: distill step: teacher {m['teacher']['accuracy']:.4f} -> "
                    f"student {m['student']['accuracy']:.4f} accuracy, "
                    f"{m['size_ratio']:.1f}x smaller."
                )
    lines += [
        "- Unstructured and gradual pruning leave a dense file and dense kernels: the zeros "
        "are only a smaller file after CSR or DEFLATE (see above), not a faster model. "
        "Structured pruning is what makes the file and the latency shrink.",
        "- The int8 file stores int8 weights plus a float32 scale per output row; the "
        "fbgemm/x86 kernel quantizes activations per batch. Quantized torch modules do not "
        "export to ONNX; the ONNX stage quantizes inside ONNX Runtime instead.",
    ]
    return lines


def render(
    rows: list[dict[str, Any]], *, seeds: int, elapsed: float, load_start: tuple[float, ...]
) -> str:
    """The markdown result table."""
    import torch

    out = [
        "# Torch compression on digits",
        "",
        f"Generated by `benchmarks/torch_compression.py` in {elapsed / 60:.1f} min; {seeds} "
        f"seeds (each its own split and teacher); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}. Load average (1/5/15 min) at start "
        f"{', '.join(f'{v:.1f}' for v in load_start)}, at end "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}: on a shared machine latencies "
        "are noisy, so compare the CIs.",
        "",
        "- size: the stored artifact (`save_model` bytes), mean over seeds.",
        "- accuracy: test accuracy (450 images) in %, mean ± 95% CI half-width (Student t, "
        "over seeds); drop: teacher minus row, per seed, averaged.",
        "- latency: each seed's stored models re-timed together at the end, interleaved in "
        f"a shuffled order per round ({ROUNDS} rounds x {RUNS} runs per model and batch "
        "size, after warm-up); "
        "shown: the median over seeds of the per-seed medians, [Student-t 95% CI of the "
        "per-seed medians], in ms. Predictor: torch eager, float32 input, softmax included.",
        "- ratio and speedup: teacher / row (size; b64 median latency).",
        "",
        "| row | size MB | ratio | accuracy % | drop pt | latency b1 ms | latency b64 ms "
        "| speedup b1 | speedup b64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        half = (r["acc"]["ci95"][1] - r["acc"]["ci95"][0]) / 2
        out.append(
            f"| {r['label']} | {r['size']['mean'] / 1e6:.4f} | {r['ratio']:.1f}x "
            f"| {r['acc']['mean']:.2f} ± {half:.2f} | {r['drop']['mean']:+.2f} "
            f"| {_ms(r['lat']['b1'])} | {_ms(r['lat']['b64'])} "
            f"| {r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x |"
        )
    out += ["", "## Sparse rows: the file is dense", ""]
    for r in rows:
        if r["sparse"] is not None:
            s = r["sparse"]
            out.append(
                f"- {r['label']}: weight sparsity {s['weight_sparsity']:.3f}; dense file "
                f"{s['size_dense_bytes'] / 1e6:.3f} MB; CSR estimate (fp32 values + int32 "
                f"indices, not a file we write) {s['size_csr_estimate_bytes'] / 1e6:.3f} MB; "
                f"DEFLATE of the dense file {s['size_deflate_bytes'] / 1e6:.3f} MB (seed 0). "
                "Dense kernels do the same work on zeros, so latency does not drop."
            )
    out += ["", "## Targets", "", *target_lines(rows), "", "## Notes", "", *notes(rows), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run every row for every seed and write the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="Seeds (>= 3 for the table).")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "torch_compression.md",
        help="Where to write the table.",
    )
    args = parser.parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mcaas-bench-") as tmp:
        per_seed = [run_seed(seed, Path(tmp)) for seed in range(args.seeds)]
    rows = aggregate(per_seed)
    text = render(
        rows, seeds=args.seeds, elapsed=time.perf_counter() - start, load_start=load_start
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
