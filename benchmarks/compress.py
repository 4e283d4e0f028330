"""Benchmark `compress` (compress to a budget in one call); writes results/compress.md.

For each model x profile, one `compress` step runs through run_single_step (so through
run_step and the safe save/load path) with max drop 1 pt. A row shows the winner's size
ratio (input file / the handed-back ONNX file), accuracy drop, batch-1 latency ratio
(native input / ONNX winner, via compare_latency: "n.d." where the 95% CIs overlap) and the
search time, against (a) the best single technique of the same run (a candidate with one
transform: one native step, or ONNX Runtime int8 alone, that passed parity and the budget)
and (b) for the 64-1024-1024-10 teacher, the best hand-written chain of
results/torch_compression.md (quoted from that file, not re-run). Each row's max_time is
scaled to the input file (SECONDS_PER_MB, at least MIN_MAX_TIME_S, at most --max-time), so
the 4.5 MB teacher gets about 7 minutes and the small models a minute and a half; the whole
run stays under about 25 minutes on 2 cores. Not a test: nothing here asserts on speed.

Run: .venv/bin/python benchmarks/compress.py [--models teacher,mlp256,cnn,rf,knn]
     [--profiles edge-8mb,mcu-256kb] [--max-time 480] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules.pipeline.local import (  # noqa: E402  (after the sys.path fix)
    LocalWorkspace,
    run_single_step,
)
from modules.storage.datasets import load_dataset  # noqa: E402
from modules.storage.model_formats import save_model  # noqa: E402
from modules.training.train import TrainParams, train_baseline  # noqa: E402

MODELS: dict[str, TrainParams] = {
    "teacher": TrainParams(model="mlp", arch={"name": "mlp", "hidden": [1024, 1024]}, epochs=20),
    "mlp256": TrainParams(model="mlp", arch={"name": "mlp", "hidden": [256, 256]}, epochs=20),
    "cnn": TrainParams(model="cnn", epochs=10),
    "rf": TrainParams(model="rf"),
    "knn": TrainParams(model="knn"),
}
LABELS = {
    "teacher": "MLP 64-1024-1024-10",
    "mlp256": "MLP 64-256-256-10",
    "cnn": "CNN (zoo default)",
    "rf": "random forest",
    "knn": "KNN",
}
HAND_CHAIN_ROW = "KD -> structured 50% -> int8"
SECONDS_PER_MB = 90.0
MIN_MAX_TIME_S = 90.0


def row_max_time(size_bytes: int, *, cap: float) -> float:
    """The search time of one row: scaled to the input file, within [MIN_MAX_TIME_S, cap]."""
    return min(cap, max(MIN_MAX_TIME_S, SECONDS_PER_MB * size_bytes / 2**20))


def hand_written_chain() -> str:
    """The best hand-written chain's ratio and drop, as results/torch_compression.md has them."""
    path = ROOT / "benchmarks" / "results" / "torch_compression.md"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| {HAND_CHAIN_ROW} |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            return f"{cells[2]} at {cells[4]} pt (torch_compression.md)"
    return "-"


def single_technique(candidates: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """The smallest passing candidate with exactly one transform, as 'ratio at drop (label)'."""
    best = None
    for c in candidates:
        if c["phase"] != "gate" or c.get("violations") != [] or "size_bytes" not in c:
            continue
        if len(c["chain"]) + len(c["tail"] or []) != 1:
            continue
        if best is None or c["size_bytes"] < best["size_bytes"]:
            best = c
    if best is None:
        return "none passed"
    ratio = baseline["size_bytes"] / best["size_bytes"]
    drop = 100 * (baseline["accuracy"] - best["accuracy"])
    return f"{ratio:.1f}x at {drop:+.2f} pt ({best['label']})"


def single_technique_ratio(candidates: list[dict[str, Any]], baseline: dict[str, Any]) -> float:
    """The size ratio of the best passing single technique (0 when none passed)."""
    sizes = [
        c["size_bytes"]
        for c in candidates
        if c["phase"] == "gate"
        and c.get("violations") == []
        and "size_bytes" in c
        and len(c["chain"]) + len(c["tail"] or []) == 1
    ]
    return baseline["size_bytes"] / min(sizes) if sizes else 0.0


def run_one(model_path: Path, profile: str, max_time: float, work: Path) -> dict[str, Any]:
    """One compress step through run_single_step; the row's cells."""
    import json

    t0 = time.perf_counter()
    record = run_single_step(
        "compress",
        {"max_drop": 1.0, "max_time_s": max_time},
        input_path=model_path,
        output_path=None,
        profile=profile,
        workspace=work,
    )
    wall = time.perf_counter() - t0
    m = record.metrics
    summary = json.loads(LocalWorkspace(work).store.get_bytes(record.files["compress.json"]))
    w = m["winner"] or {}
    speed = (w.get("latency_vs_input") or {}).get("ratio")
    return {
        "met": m["met_goal"],
        "winner": w.get("label", "-"),
        "ratio": f"{w['size_ratio']:.1f}x" if w else "-",
        "drop": f"{w['drop_pt']:+.2f}" if w else "-",
        "speedup": "n.d." if speed is None else f"{speed:.2f}x",
        "time": f"{wall:.0f} s",
        "stopped_by": m["stopped_by"],
        "max_time": f"{max_time:.0f} s",
        "single": single_technique(summary["candidates"], m["baseline"]),
        "reason": m["reason"],
        "skipped": summary.get("skipped", []),
        "met_single": single_technique_ratio(summary["candidates"], m["baseline"]),
        "ratio_value": w.get("size_ratio"),
        "drop_value": w.get("drop_pt"),
        "wall_s": wall,
        "parity_passed": bool((w.get("parity") or {}).get("passed")),
    }


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each met or missed with the numbers of this run."""
    out = []
    for r in rows:
        if r["name"] == "teacher" and r["ratio_value"] is not None:
            ok = r["met"] and r["ratio_value"] >= 50 and r["drop_value"] <= 1 and r["wall_s"] <= 600
            out.append(
                f"- {r['model']} on {r['profile']}: >= 50x at <= 1 pt within 600 s: "
                f"{'met' if ok else 'missed'} ({r['ratio']}, {r['drop']} pt, {r['time']})"
            )
    for r in rows:
        single = r["met_single"]
        ok = r["ratio_value"] is not None and r["ratio_value"] >= single
        versus = f"{single:.1f}x" if single else "no single technique passed"
        out.append(
            f"- {r['model']} on {r['profile']}: at least as small as the best single technique: "
            f"{'met' if ok else 'missed'} ({r['ratio']} vs {versus})"
        )
    failed = [f"{r['model']} on {r['profile']}" for r in rows if not r["parity_passed"]]
    out.append(
        "- no row returns a candidate that failed the parity gate: "
        + ("met" if not failed else "missed: " + ", ".join(failed))
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--profiles", default="edge-8mb,mcu-256kb")
    parser.add_argument(
        "--max-time", type=float, default=480.0, help="the largest per-row max_time (s)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compress.md")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: unknown models {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    profiles = [p for p in args.profiles.split(",") if p]
    data = load_dataset("digits")
    start = time.perf_counter()
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mcaas-bench-compress-") as tmp:
        for name in models:
            artifact, _ = train_baseline(MODELS[name], data, seed=0)
            path = Path(tmp) / f"{name}{artifact.suffix}"
            path.write_bytes(save_model(artifact))
            for profile in profiles:
                work = Path(tmp) / f"ws-{name}-{profile}"
                max_time = row_max_time(path.stat().st_size, cap=args.max_time)
                result = run_one(path, profile, max_time, work)
                result.update(model=LABELS[name], profile=profile, name=name)
                result["hand"] = hand_written_chain() if name == "teacher" else "-"
                rows.append(result)
                print(result, flush=True)
    load_end = os.getloadavg()
    import torch

    lines = [
        "# Compress to a budget on digits",
        "",
        f"Generated by `benchmarks/compress.py` in {(time.perf_counter() - start) / 60:.1f} min "
        f"(models: {', '.join(models)}; profiles: {', '.join(profiles)}; max drop 1 pt absolute; "
        f"max_time per row {SECONDS_PER_MB:g} s per MB of input, {MIN_MAX_TIME_S:g} to "
        f"{args.max_time:g} s); torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {platform.machine()}, Python {platform.python_version()}. Load average "
        f"(1/5/15 min) at start {', '.join(f'{v:.1f}' for v in load_start)}, at end "
        f"{', '.join(f'{v:.1f}' for v in load_end)}: on a shared machine latencies are noisy.",
        "",
        "- ratio: input file / the handed-back ONNX file; drop: input accuracy minus the ONNX "
        "winner's, test split, in points.",
        "- speedup: batch-1 latency, native input / ONNX winner (ONNX Runtime), only where "
        "the 95% CIs of the medians do not overlap (`compare_latency`); n.d. = no measurable "
        "difference.",
        "- single technique: the smallest candidate of the same run with one transform that "
        "passed parity and the budget.",
        "",
        "| model | profile | met | winner | ratio | drop pt | speedup b1 | search time | "
        "max_time | stopped by | best single technique | best hand-written chain |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['profile']} | {'yes' if r['met'] else 'no'} | "
            f"{re.sub(r'[|]', '/', r['winner'])} | {r['ratio']} | {r['drop']} | {r['speedup']} | "
            f"{r['time']} | {r['max_time']} | {r['stopped_by']} | {r['single']} | {r['hand']} |"
        )
    lines += ["", "## Outcomes", ""]
    lines += [f"- {r['model']} on {r['profile']}: {r['reason']}" for r in rows]
    lines += ["", "## Targets", ""]
    lines += target_lines(rows)
    lines += ["", "## Candidate kinds skipped, and why", ""]
    seen: set[str] = set()
    for r in rows:
        for item in r["skipped"]:
            if item["kind"] not in seen:
                seen.add(item["kind"])
                lines.append(f"- {item['kind']} ({r['model']}): {item['why']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
