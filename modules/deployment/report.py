"""The `report` step: report.json, a self-contained report.html and steps.csv for the job.

It reads the records of the job's earlier steps (ctx.history), so it belongs last: every
step before it is in the report, with its params, metrics and gate verdict, plus the job's
config (profile, seed, dataset fingerprint, library versions). report.html needs no server:
styles are inline and every plot is embedded as a base64 PNG data URI; everything that
came from a user (ids, params, reasons) is HTML-escaped by the template engine. The plots
(PNG and SVG) are also stored as files of the step: the per-step waterfall of size and
latency, the trade-off, resource and Pareto plots of any sweep or auto step, the per-layer
params and latency bars of a profile step and the curves of a sensitivity step.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from jinja2 import Environment
from pydantic import BaseModel, ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.evaluation.pareto import DEFAULT_MAXIMIZE, DEFAULT_MINIMIZE, pareto_front, tradeoff_x
from modules.evaluation.plots import (
    budget_figure,
    layer_figure,
    pareto_figure,
    render,
    resource_figure,
    sensitivity_figure,
    tradeoff_figure,
    waterfall_figure,
)
from modules.evaluation.summary import (
    batch_column_title,
    fmt_batch_latency,
    fmt_latency,
    job_report,
    summary_csv,
    summary_row,
)
from modules.storage.datasets import Dataset


class ReportParams(BaseModel):
    """Params of the `report` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    title: str = Field(default="", max_length=200, description="Report title; default: job id.")
    plots: bool = Field(default=True, description="Draw and embed the plots.")


def job_config(ctx: StepContext, params: ReportParams) -> dict[str, Any]:
    """The job's configuration as far as a step can see it: ids, profile, seed, steps."""
    history = ctx.history
    steps = [{"name": r["step"], "params": r.get("params", {})} for r in history]
    steps.append({"name": ctx.step_name, "params": params.model_dump(mode="json")})
    return {
        "job_id": ctx.job_id,
        "user_id": ctx.user_id,
        "profile": ctx.profile.model_dump(mode="json"),
        "seed": ctx.seed,
        "repeats": ctx.repeats,
        "model": history[0].get("input_key") if history else None,
        "dataset": history[0].get("dataset") if history else None,
        "versions": history[-1].get("versions") if history else None,
        "steps": steps,
    }


def job_status(ctx: StepContext) -> str:
    """COMPLETED when this report is the job's last step (earlier gates all passed to get here)."""
    n_steps = next((r.get("n_steps") for r in ctx.history if r.get("n_steps")), None)
    return "COMPLETED" if n_steps is None or ctx.step_index >= n_steps - 1 else "INPROGRESS"


def _waterfall_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "index": r["index"],
            "step": r["step"],
            "size_bytes": r["size_bytes"],
            "latency_ms": r["latency_b1_ms"],
        }
        for r in summary
    ]


def report_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """name -> Figure: the waterfall, and each sweep/auto/budget/profile/sensitivity plot."""
    figures: dict[str, Any] = {
        "waterfall": waterfall_figure(_waterfall_rows([summary_row(r) for r in records]))
    }
    for record in records:
        metrics = record.get("metrics") or {}
        rows = [r for r in metrics.get("rows") or [] if isinstance(r, dict)]
        tag = f"{record['index']:02d}_{record['step']}"
        layers = [r for r in metrics.get("layers") or [] if isinstance(r, dict)]
        if record["step"] == "profile" and layers:
            figures[f"{tag}_layers"] = layer_figure(layers)
        elif record["step"] == "sensitivity" and rows:
            figures[f"{tag}_sensitivity"] = sensitivity_figure(rows)
        elif record["step"] == "budget_sweep" and rows:
            figures[f"{tag}_budget"] = budget_figure(rows)
        elif record["step"] in {"sweep", "auto"} and rows:
            measured = [r for r in rows if not r.get("error")]
            front = pareto_front(measured, minimize=DEFAULT_MINIMIZE, maximize=DEFAULT_MAXIMIZE)
            figures[f"{tag}_pareto"] = pareto_figure(measured, front)
            figures[f"{tag}_resources"] = resource_figure(measured)
            if record["step"] == "sweep":
                x, label = tradeoff_x(measured, str(metrics.get("param", "value")))
                points = [r for r in measured if x == "sparsity" or r.get("value") is not None]
                figures[f"{tag}_tradeoff"] = tradeoff_figure(points, x=x, x_label=label)
    return figures


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.l { text-align: left; }
.pass { color: #176c2e; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #666; font-size: 0.85em; }
</style></head><body>
<h1>{{ title }}</h1>
<p>job <code>{{ report.job_id }}</code> of user <code>{{ report.user_id }}</code>,
profile <code>{{ profile.name }}</code> ({{ profile.memory_budget_mb }} MB RAM,
compute scale {{ profile.compute_scale }}, {{ profile.power_w }} W),
status <span class="{{ 'pass' if report.status == 'COMPLETED' else 'fail' }}">
{{- report.status }}</span>,
generated {{ report.generated_at }}.</p>
{% if report.dataset %}<p>dataset {{ report.dataset.name }}
({{ report.dataset.n_train }} train / {{ report.dataset.n_test }} test samples,
sha256 <code>{{ report.dataset.fingerprint }}</code>)</p>{% endif %}

<h2>Gate verdicts</h2>
{% if report.verdicts %}<table><tr><th>#</th><th>step</th><th>verdict</th><th>reason</th></tr>
{% for v in report.verdicts %}<tr><td>{{ v.index }}</td><td class="l">{{ v.step }}</td>
<td class="{{ 'pass' if v.passed else 'fail' }}">{{ 'pass' if v.passed else 'REJECTED' }}</td>
<td class="l">{{ v.reason }}</td></tr>{% endfor %}</table>
{% else %}<p>No gate ran before this report.</p>{% endif %}

<h2>Steps</h2>
<table><tr><th>#</th><th>step</th><th>framework</th><th>size</th><th>accuracy</th>
<th>batch-1 latency ms (median, 95% CI)</th><th>{{ batch_title }} latency ms</th>
<th>est. latency ms (estimate)</th><th>energy mJ/inference (estimate)</th><th>verdict</th>
<th>duration s</th></tr>
{% for r in report.summary %}<tr><td>{{ r.index }}</td><td class="l">{{ r.step }}</td>
<td class="l">{{ r.framework or '-' }}</td><td>{{ size(r.size_bytes) }}</td>
<td>{{ pct(r.accuracy) }}</td>
<td>{{ ms(r.latency_b1_ms, r.latency_b1_ci95, r.latency_b1_noisy) }}</td>
<td>{{ batch_ms(r) }}</td>
<td>{{ num(r.estimated_latency_b1_ms) }}</td>
<td>{{ num(r.energy_mj_estimate) }}</td><td>{{ r.verdict or '-' }}</td>
<td>{{ num(r.duration_s) }}</td></tr>{% endfor %}
<tr><td>{{ this_index }}</td><td class="l">{{ this_step }}</td><td colspan="9" class="l">
this report</td></tr></table>
<p class="note">Latency: warm-up runs, then timed runs; the median with its 95% CI. Estimates
for the profile: latency = measured / compute scale; energy = power x estimated latency
(W x ms = mJ), an estimate, not a measurement.</p>

{% if plots %}<h2>Plots</h2>
{% for p in plots %}<figure><figcaption>{{ p.name }}</figcaption>
<img alt="{{ p.name }}" src="data:image/png;base64,{{ p.png }}"></figure>{% endfor %}{% endif %}

<h2>Step details</h2>
{% for r in report.steps %}<details><summary>step {{ r.index }}: {{ r.step }}
{% if r.verdict %}({{ 'pass' if r.verdict.passed else 'REJECTED' }}){% endif %}</summary>
<p>input <code>{{ r.input_key }}</code> &rarr; output <code>{{ r.output_key }}</code>
({{ r.output_size }} bytes), {{ num(r.duration_s) }} s</p>
<pre>{{ dump({"params": r.params, "metrics": r.metrics, "files": r.files}) }}</pre></details>
{% endfor %}

<h2>Config</h2>
<pre>{{ dump(report.config) }}</pre>
</body></html>
"""


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value * 100:.2f}%"


def _num(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.4g}"


def render_html(
    report: dict[str, Any],
    plots: dict[str, dict[str, bytes]],
    *,
    title: str,
    this_index: int,
    this_step: str,
) -> str:
    """The self-contained HTML report (plots as base64 data URIs, user text escaped)."""
    env = Environment(autoescape=True)
    summary = report.get("summary") or []
    env.globals.update(
        size=_size,
        pct=_pct,
        num=_num,
        ms=fmt_latency,
        batch_ms=lambda row: fmt_batch_latency(row, summary),
        batch_title=batch_column_title(summary),
        dump=lambda v: json.dumps(v, indent=2, default=str),
    )
    images = [
        {"name": name, "png": base64.b64encode(blobs["png"]).decode("ascii")}
        for name, blobs in plots.items()
    ]
    profile = (report.get("config") or {}).get("profile") or {}
    return env.from_string(_TEMPLATE).render(
        report=report,
        profile=profile,
        plots=images,
        title=title,
        this_index=this_index,
        this_step=this_step,
    )


def build_report(
    records: list[dict[str, Any]],
    *,
    config: dict[str, Any],
    status: str,
    title: str,
    this_index: int,
    this_step: str,
    plots: bool = True,
) -> dict[str, bytes]:
    """report.json, report.html, steps.csv and the plot files for these step records."""
    report = job_report(spec=config, status=status, reason=None, records=records)
    rendered = {name: render(fig) for name, fig in report_figures(records).items()} if plots else {}
    report["plots"] = [f"{name}.{fmt}" for name in rendered for fmt in ("png", "svg")]
    files = {
        "report.json": json.dumps(report, indent=2, default=str).encode(),
        "report.html": render_html(
            report, rendered, title=title, this_index=this_index, this_step=this_step
        ).encode(),
        "steps.csv": summary_csv(report["summary"]).encode(),
    }
    for name, blobs in rendered.items():
        for fmt, blob in blobs.items():
            files[f"{name}.{fmt}"] = blob
    return files


@register_step("report", params=ReportParams, accepts={"torch", "sklearn", "onnx"})
def report(
    model: ModelArtifact, data: Dataset, params: ReportParams, ctx: StepContext
) -> StepOutput:
    """Write report.json, a self-contained report.html (plots embedded) and steps.csv."""
    files = build_report(
        ctx.history,
        config=job_config(ctx, params),
        status=job_status(ctx),
        title=params.title or f"MCaaS job {ctx.job_id}",
        this_index=ctx.step_index,
        this_step=ctx.step_name,
        plots=params.plots,
    )
    verdicts = [r["verdict"] for r in ctx.history if r.get("verdict")]
    metrics = {
        "steps_reported": len(ctx.history),
        "gates_reported": len(verdicts),
        "gates_passed": sum(bool(v.get("passed")) for v in verdicts),
        "plots": sorted(name for name in files if name.endswith(".png")),
        "report_bytes": len(files["report.html"]),
    }
    return StepOutput(model=None, metrics=metrics, files=files)
