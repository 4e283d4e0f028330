"""Benchmark ONNX int8: fp32 vs dynamic vs static vs the search's choice vs a peer tool.

Writes results/onnx_int8_search.md. Three models, each quantized several ways from the same
fp32 ONNX graph and the same calibration rows:

* the test transformer (tests.text_encoder) at 6 layers x 384 wide, 12 heads, sequence 128,
  with function-preserving outlier channels (channel_spread 1.0), then distilled for a few
  steps towards a bag-of-token-embeddings teacher so that its activations are shaped by an
  objective, not only by the random init. Compared by cosine per row of the embedding.
* the zoo CNN trained on digits, and a ResNet-18-shaped zoo net (widths 64-512, 2 basic
  blocks per stage) trained briefly on digits (8x8, so it is ResNet-18's parameters, not
  its image size). Compared by label agreement with fp32 and by test accuracy.

Rows: fp32; ORT dynamic int8 (per-channel); static per-channel MinMax (uint8
activations, int8 weights, QOperator format: the default); the same in QDQ format; static
with SmoothQuant (transformer); dynamic with SmoothQuant (transformer); the accuracy-aware
search (`search_int8`, its default budget but `max_trials`; the time it took); and a peer
row from NNCF's `nncf.quantize` for ONNX on the same calibration rows when nncf is
installed (the `bench` extra). For the torch nets the static row is the `quantize_static`
step (export + static int8 at its defaults), followed by the format and type variants
the default was chosen from: QDQ vs QOperator, U8S8 vs U8U8 vs S8S8 (activations x
weights), per-channel vs per-tensor. Every int8 graph is compacted (the note says how many
bytes that took off). Latency at batch 1 and 32, 1 ONNX Runtime thread, every row's
session timed interleaved (ROUNDS rounds of a few runs each), median with its 95% CI.
Not a test: nothing here asserts on speed.

Run: .venv/bin/python benchmarks/onnx_int8_search.py [--out PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules.core.artifact import ModelArtifact  # noqa: E402  (after sys.path)
from modules.core.profiles import get_profile  # noqa: E402
from modules.core.step import StepContext  # noqa: E402
from modules.deployment.onnx_export import OnnxExportParams, export_model  # noqa: E402
from modules.deployment.onnx_int8 import (  # noqa: E402
    QuantSettings,
    calibration_feeds,
    prepare_graph,
    quantize_prepared,
)
from modules.deployment.onnx_search import SearchBudget, search_int8  # noqa: E402
from modules.deployment.parity_metrics import GateThresholds, cosine_rows  # noqa: E402
from modules.deployment.quantize_static import (  # noqa: E402
    QuantizeStaticParams,
    quantize_static,
)
from modules.evaluation.stats import summarize  # noqa: E402
from modules.storage.datasets import Dataset, load_dataset  # noqa: E402
from modules.storage.model_formats import save_model  # noqa: E402
from modules.training.train import TrainParams, train_baseline  # noqa: E402
from tests.text_encoder import text_encoder, text_encoder_inputs, text_encoder_onnx  # noqa: E402

ENCODER: dict[str, Any] = {
    "vocab_size": 8000,
    "max_len": 128,
    "dim": 384,
    "heads": 12,
    "layers": 6,
    "ff_dim": 1536,
    "channel_spread": 1.0,
}
SEQ_LEN = 128
# Sized to finish in about a quarter of an hour on 2 busy cores (the transformer at batch
# 32 x 128 tokens takes seconds per run there, hence one b32 run per round).
CONFIG: dict[str, Any] = {
    "distill_steps": 20,
    "distill_batch": 16,
    "distill_seq": 32,
    "eval_rows": 16,
    "calibration_rows": 32,
    "search_trials": 20,
    "rounds": 3,
    "runs_b1": 5,
    "runs_b32": 1,
    "cnn_epochs": 10,
    "resnet_epochs": 2,
}
QUICK: dict[str, Any] = {
    **CONFIG,
    "distill_steps": 5,
    "eval_rows": 8,
    "calibration_rows": 16,
    "search_trials": 4,
    "rounds": 2,
    "cnn_epochs": 2,
    "resnet_epochs": 1,
}
# Timed runs per session and round: at least the config's, more for fast graphs, up to
# about this many seconds of the fp32 session per round (a tiny CNN's run is 0.2 ms, so
# 1 run per round would give its median three samples).
ROUND_BUDGET_S = 0.25
MAX_RUNS = 50
CNN_ARCH = {"name": "cnn", "channels": [32, 64]}
RESNET18 = {"name": "resnet", "widths": [64, 128, 256, 512], "blocks": [2, 2, 2, 2]}
TARGETS = {"transformer": (3.7, 0.99), "cnn": (3.8, 0.5)}


def _ctx(workdir: Path) -> StepContext:
    return StepContext(
        job_id="bench",
        user_id="local",
        profile=get_profile("cloud-cpu"),
        seed=0,
        repeats=1,
        step_index=0,
        step_name="bench",
        workdir=workdir,
        history=[],
        load_model=None,
    )


def distilled_encoder(config: dict[str, Any]) -> Any:
    """The encoder after a short distillation towards a bag-of-token-embeddings teacher."""
    import torch

    model = text_encoder(**ENCODER).train()
    gen = torch.Generator().manual_seed(7)
    teacher = torch.randn(ENCODER["vocab_size"], ENCODER["dim"], generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for step in range(config["distill_steps"]):
        rows = text_encoder_inputs(
            rows=config["distill_batch"],
            seq_len=config["distill_seq"],
            vocab_size=ENCODER["vocab_size"],
            seed=100 + step,
        )
        ids = torch.from_numpy(rows["input_ids"])
        mask = torch.from_numpy(rows["attention_mask"])
        keep = mask.float()[:, :, None]
        target = (teacher[ids] * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        out = model(ids, mask)
        loss = 1 - torch.nn.functional.cosine_similarity(out, target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class Bench:
    """One model's fp32 graph, its evaluation feeds and calibration batches, and its rows."""

    def __init__(
        self,
        name: str,
        proto: Any,
        *,
        feeds: dict[str, np.ndarray],
        calibration: list[dict[str, np.ndarray]],
        kind: Literal["embedding", "labels"],
        labels: np.ndarray | None,
        workdir: Path,
    ) -> None:
        self.name, self.proto, self.feeds, self.kind = name, proto, feeds, kind
        self.calibration, self.labels, self.workdir = calibration, labels, workdir
        self.reference = _run(proto, feeds)
        self.rows: list[dict[str, Any]] = []
        self.source, _ = prepare_graph(proto, workdir)
        self.add("fp32", proto, note="reference")

    def parity(self, out: np.ndarray) -> dict[str, float]:
        if self.kind == "embedding":
            cos = cosine_rows(self.reference, out)
            return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        agree = float((out.argmax(1) == self.reference.argmax(1)).mean())
        assert self.labels is not None
        acc = float((out.argmax(1) == self.labels).mean())
        return {"agreement": agree, "accuracy": acc}

    def add(self, label: str, proto: Any, *, note: str = "", seconds: float | None = None) -> None:
        if proto is None:
            self.rows.append({"label": label, "error": note})
            return
        self.rows.append(
            {
                "label": label,
                "proto": proto,
                "size": proto.ByteSize(),
                "parity": self.parity(_run(proto, self.feeds)),
                "note": note,
                "seconds": seconds,
            }
        )

    def quantize(self, label: str, settings: QuantSettings) -> None:
        start = time.perf_counter()
        try:
            q, details = quantize_prepared(
                self.source, settings, workdir=self.workdir, calibration=self.calibration
            )
        except Exception as exc:  # a setting ORT cannot quantize is a row with its error
            self.add(label, None, note=f"{type(exc).__name__}: {exc}"[:200])
            return
        note = settings.label() + _compaction_note(details)
        self.add(label, q, note=note, seconds=time.perf_counter() - start)

    def search(self, trials: int) -> None:
        (self.workdir / "search").mkdir(exist_ok=True)
        start = time.perf_counter()
        result = search_int8(
            self.proto,
            feeds=self.feeds,
            calibration=self.calibration,
            thresholds=GateThresholds(output_kind=self.kind),
            meta={},
            workdir=self.workdir / "search",
            budget=SearchBudget(max_trials=trials, latency_runs=3),
        )
        seconds = time.perf_counter() - start
        chosen = result.chosen["label"] if result.chosen else "nothing"
        verdict = "passed" if result.verdict.passed else "FAILED the gate"
        note = f"{chosen} ({len(result.trials)} trials, {verdict})"
        self.add("search choice", result.model, note=note, seconds=seconds)

    def peer(self, *, transformer: bool) -> None:
        try:
            import nncf
        except ImportError:
            self.add("NNCF (peer)", None, note="nncf not installed (pip install .[bench])")
            return
        items = [
            {k: v[i : i + 1] for k, v in batch.items()}
            for batch in self.calibration
            for i in range(len(next(iter(batch.values()))))
        ]
        start = time.perf_counter()
        try:
            kwargs: dict[str, Any] = {"subset_size": len(items)}
            if transformer:
                kwargs["model_type"] = nncf.ModelType.TRANSFORMER
            import onnx

            # The same pre-processed graph our quantizer gets (NNCF asks for shapes).
            prepared = onnx.load(str(self.source))
            q = nncf.quantize(prepared, nncf.Dataset(items), **kwargs)
        except Exception as exc:  # the peer's own failure is reported, not raised
            self.add("NNCF (peer)", None, note=f"{type(exc).__name__}: {exc}"[:200])
            return
        note = f"nncf {nncf.__version__} quantize, {len(items)} rows"
        if transformer:
            note += ", ModelType.TRANSFORMER"
        self.add("NNCF (peer)", q, note=note, seconds=time.perf_counter() - start)

    def time_rows(self, config: dict[str, Any]) -> None:
        """Latency of every row at batch 1 and 32, sessions interleaved, 1 thread."""
        import onnxruntime as ort

        live = [r for r in self.rows if "proto" in r]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        sessions = [
            ort.InferenceSession(
                r["proto"].SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for r in live
        ]
        self.runs: dict[int, int] = {}
        for batch, least in ((1, config["runs_b1"]), (32, config["runs_b32"])):
            feed = {k: _repeat_rows(v, batch) for k, v in self.feeds.items()}
            samples: list[list[float]] = [[] for _ in live]
            for session in sessions:
                session.run(None, feed)
            start = time.perf_counter()
            sessions[0].run(None, feed)  # the fp32 row sets how many runs a round affords
            once = time.perf_counter() - start
            runs = max(least, min(MAX_RUNS, int(ROUND_BUDGET_S / max(once, 1e-6))))
            self.runs[batch] = runs
            for _ in range(config["rounds"]):
                for i, session in enumerate(sessions):
                    for _ in range(runs):
                        start = time.perf_counter()
                        session.run(None, feed)
                        samples[i].append((time.perf_counter() - start) * 1000)
            for row, s in zip(live, samples, strict=True):
                row[f"b{batch}"] = summarize(s, unit="ms")

    def table(self) -> list[str]:
        embedding = self.kind == "embedding"
        heads = "min cosine | mean cosine" if embedding else "agreement | accuracy"
        lines = [
            f"| row | size MB | ratio | {heads} | b1 ms [95% CI] | b1 speedup | "
            "b32 ms [95% CI] | b32 speedup | time s | what |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        fp32 = self.rows[0]
        for r in self.rows:
            if "proto" not in r:
                lines.append(f"| {r['label']} | - | - | - | - | - | - | - | - | - | {r['error']} |")
                continue
            p = r["parity"]
            a, b = (
                (f"{p['min_cosine']:.4f}", f"{p['mean_cosine']:.4f}")
                if embedding
                else (f"{p['agreement']:.4f}", f"{100 * p['accuracy']:.2f}%")
            )
            secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
            lines.append(
                f"| {r['label']} | {r['size'] / 1e6:.2f} | {fp32['size'] / r['size']:.2f}x | "
                f"{a} | {b} | {_ms(r['b1'])} | {_speedup(fp32['b1'], r['b1'])} | "
                f"{_ms(r['b32'])} | {_speedup(fp32['b32'], r['b32'])} | {secs} | {r['note']} |"
            )
        return lines


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _compaction_note(details: dict[str, Any]) -> str:
    info = details.get("compaction") or {}
    if not info.get("compacted"):
        return ""
    return f"; compacted {info['size_bytes_before']:,} -> {info['size_bytes_after']:,} bytes"


def _repeat_rows(values: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // len(values))
    return np.concatenate([values] * reps)[:batch]


def _run(proto: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _ms(stat: dict[str, Any]) -> str:
    lo, hi = stat["median_ci95"]
    return f"{stat['median']:.2f} [{lo:.2f}, {hi:.2f}]"


def _speedup(base: dict[str, Any], other: dict[str, Any]) -> str:
    ratio = base["median"] / other["median"]
    overlap = other["median_ci95"][0] <= base["median_ci95"][1] and (
        base["median_ci95"][0] <= other["median_ci95"][1]
    )
    return f"{ratio:.2f}x" + (" (CIs overlap)" if overlap else "")


def bench_transformer(root: Path, config: dict[str, Any]) -> Bench:
    """Distil, export and quantize the transformer every way."""
    import onnx

    start = time.perf_counter()
    model = distilled_encoder(config)
    distill_s = time.perf_counter() - start
    proto = onnx.load_model_from_string(text_encoder_onnx(model))
    vocab = ENCODER["vocab_size"]
    feeds = text_encoder_inputs(rows=config["eval_rows"], seq_len=SEQ_LEN, vocab_size=vocab, seed=1)
    calib_rows = text_encoder_inputs(
        rows=config["calibration_rows"], seq_len=SEQ_LEN, vocab_size=vocab, seed=2
    )
    calibration = calibration_feeds(
        calib_rows, samples=len(calib_rows["input_ids"]), batch=16, seed=0
    )
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        "transformer",
        proto,
        feeds=feeds,
        calibration=calibration,
        kind="embedding",
        labels=None,
        workdir=root,
    )
    bench.distill_s = distill_s  # type: ignore[attr-defined]
    bench.quantize("dynamic", QuantSettings(mode="dynamic", per_channel=True))
    static = QuantSettings(mode="static", per_channel=True, activation_type="uint8")
    bench.quantize("static", static)
    bench.quantize("static QDQ", replace(static, quant_format="qdq"))
    bench.quantize("static + SmoothQuant 0.5", replace(static, smooth_alpha=0.5))
    bench.quantize(
        "dynamic + SmoothQuant 0.5",
        QuantSettings(mode="dynamic", per_channel=True, smooth_alpha=0.5),
    )
    bench.search(config["search_trials"])
    bench.peer(transformer=True)
    return bench


def bench_torch_net(
    root: Path, config: dict[str, Any], *, name: str, build: Callable[[Dataset], ModelArtifact]
) -> Bench:
    """Export a torch net on digits, quantize it every way (static: the quantize_static step)."""
    data = load_dataset("digits")
    artifact = build(data)
    exported, _ = export_model(artifact, data, OnnxExportParams())
    feeds = {"input": data.X_test}
    calibration = calibration_feeds(
        {"input": data.X_train}, samples=config["calibration_rows"] * 4, batch=32, seed=0
    )
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        name,
        exported.obj,
        feeds=feeds,
        calibration=calibration,
        kind="labels",
        labels=data.y_test,
        workdir=root,
    )
    bench.torch_bytes = len(save_model(artifact))  # type: ignore[attr-defined]
    bench.quantize("dynamic", QuantSettings(mode="dynamic", per_channel=True))
    step_dir = root / "step"
    step_dir.mkdir()
    start = time.perf_counter()
    params = QuantizeStaticParams(calibration_samples=config["calibration_rows"] * 4)
    out = quantize_static(artifact, data, params, _ctx(step_dir))
    seconds = time.perf_counter() - start
    note = out.verdict.reason if out.verdict else ""
    bench.add(
        "static (quantize_static step)",
        out.model.obj if out.model is not None else None,
        note=note + _compaction_note(out.metrics),
        seconds=seconds,
    )
    # What the step's default (QOperator, U8S8, per-channel) was chosen from.
    u8s8 = QuantSettings(mode="static", per_channel=True, activation_type="uint8")
    for label, settings in (
        ("static QDQ U8S8", replace(u8s8, quant_format="qdq")),
        ("static QOperator U8U8", replace(u8s8, weight_type="uint8")),
        ("static QDQ U8U8", replace(u8s8, weight_type="uint8", quant_format="qdq")),
        ("static QOperator S8S8", replace(u8s8, activation_type="int8")),
        ("static QOperator U8S8 per-tensor", replace(u8s8, per_channel=False)),
    ):
        bench.quantize(label, settings)
    bench.search(config["search_trials"])
    bench.peer(transformer=False)
    return bench


def _trained(arch: dict[str, Any], epochs: int) -> Callable[[Dataset], ModelArtifact]:
    def build(data: Dataset) -> ModelArtifact:
        kind = arch["name"]
        artifact, _ = train_baseline(
            TrainParams(model=kind, arch=arch, epochs=epochs), data, seed=0
        )
        return artifact

    return build


def _targets(bench: Bench, key: str) -> str:
    search = next((r for r in bench.rows if r["label"] == "search choice" and "proto" in r), None)
    static = next((r for r in bench.rows if r["label"].startswith("static") and "proto" in r), None)
    fp32 = bench.rows[0]
    ratio_target, quality_target = TARGETS[key]
    lines = []
    for label, row in (("search choice", search), ("static", static)):
        if row is None:
            lines.append(f"- {bench.name} {label}: no graph")
            continue
        ratio = fp32["size"] / row["size"]
        faster = row["b32"]["median_ci95"][1] < fp32["b32"]["median_ci95"][0]
        if key == "transformer":
            quality = row["parity"]["min_cosine"]
            ok_q, q_text = (
                quality >= quality_target,
                f"min cosine {quality:.4f} >= {quality_target}",
            )
        else:
            drop = 100 * (fp32["parity"]["accuracy"] - row["parity"]["accuracy"])
            ok_q, q_text = (
                drop <= quality_target,
                f"accuracy drop {drop:.2f} pt <= {quality_target}",
            )
        checks = [
            (ratio >= ratio_target, f"{ratio:.2f}x >= {ratio_target}x"),
            (ok_q, q_text),
            (faster, "faster than fp32 at b32 (CIs apart)"),
        ]
        if label == "search choice" and row["seconds"] is not None and key == "transformer":
            checks.append((row["seconds"] <= 120, f"found in {row['seconds']:.0f} s <= 120 s"))
        met = all(ok for ok, _ in checks)
        lines.append(
            f"- {bench.name} {label}: {'met' if met else 'NOT met'}: "
            + "; ".join(f"{t} ({'ok' if ok else 'no'})" for ok, t in checks)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the three models and write the markdown table."""
    import onnxruntime
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_int8_search.md"
    )
    parser.add_argument("--quick", action="store_true", help="A smoke run with tiny budgets.")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else CONFIG
    torch.manual_seed(0)
    start_load = _load()
    start = time.perf_counter()
    sections: list[str] = []
    targets: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mcaas-bench-int8-") as tmp:
        benches = [
            ("transformer", bench_transformer(Path(tmp) / "enc", config)),
            (
                "cnn",
                bench_torch_net(
                    Path(tmp) / "cnn",
                    config,
                    name="zoo CNN (32-64)",
                    build=_trained(CNN_ARCH, config["cnn_epochs"]),
                ),
            ),
            (
                "cnn",
                bench_torch_net(
                    Path(tmp) / "resnet",
                    config,
                    name="ResNet-18-shaped",
                    build=_trained(RESNET18, config["resnet_epochs"]),
                ),
            ),
        ]
        for key, bench in benches:
            bench.time_rows(config)
            title = f"## {bench.name}"
            extra = ""
            if hasattr(bench, "distill_s"):
                extra = (
                    f"6 x 384, 12 heads, seq {SEQ_LEN}, distilled {config['distill_steps']} "
                    f"steps in {bench.distill_s:.0f} s; "
                )
            if hasattr(bench, "torch_bytes"):
                extra = f"torch file {bench.torch_bytes / 1e6:.2f} MB; "
            sections += [
                title,
                "",
                f"{extra}{len(next(iter(bench.feeds.values())))} evaluation rows, "
                f"{sum(len(next(iter(b.values()))) for b in bench.calibration)} calibration rows; "
                f"timed {config['rounds']} rounds x {bench.runs[1]} runs (b1), "
                f"x {bench.runs[32]} runs (b32).",
                "",
                *bench.table(),
                "",
            ]
            targets.append(_targets(bench, key))
    minutes = (time.perf_counter() - start) / 60
    header = [
        "# ONNX int8: fp32, dynamic, static, search and a peer tool",
        "",
        f"Generated by `benchmarks/onnx_int8_search.py{' --quick' if args.quick else ''}` in "
        f"{minutes:.1f} min; onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}, Python {platform.python_version()}, on a 2-core machine shared "
        "with other work while this ran (latency CIs are wide for that reason); 1/5/15-minute "
        f"load average {start_load} at the start, {_load()} at the end.",
        "",
        "- ratio: fp32 ONNX bytes / row bytes. agreement: labels equal to fp32 ONNX's on the "
        "digits test split; accuracy: on that split. cosine: per embedding row vs fp32.",
        "- latency: 1 ORT thread, all rows' sessions interleaved, "
        f"{config['rounds']} rounds of at least {config['runs_b1']} runs (b1) / "
        f"{config['runs_b32']} (b32) per row, more where the fp32 run is short (up to "
        f"{MAX_RUNS}, about {ROUND_BUDGET_S:g} s of fp32 per round; each section says how "
        "many); median [95% CI]; speedup vs fp32 ONNX, '(CIs overlap)' = no measurable "
        "difference.",
        "- time s: the quantization's own time (the search: the whole search).",
        "",
        "## Targets (issue 18)",
        "",
        *targets,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + sections), encoding="utf-8")
    print(f"wrote {args.out} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
