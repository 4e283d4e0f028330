"""`mcaas`: train baselines, run jobs, list steps and profiles, and the embedded demo."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modules.core.jobspec import DEFAULT_PROFILE
from modules.errors import BadInputError, McaasError, NotFoundError

if TYPE_CHECKING:
    from modules.core.records import StepRecord

app = typer.Typer(help="MCaaS: Model Compression as a Service.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(fn: F) -> F:
    """Turn our errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except McaasError as exc:
            err_console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _fmt_size(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def summary_table(title: str, rows: list[dict[str, Any]]) -> Table:
    from modules.evaluation.summary import (
        NOISY_MARK,
        batch_column_title,
        fmt_batch_latency,
        fmt_latency,
    )

    table = Table(title=title)
    for col in (
        "#",
        "step",
        "fw",
        "size",
        "acc",
        "b1 ms",
        f"{batch_column_title(rows)} ms",
        "verdict",
    ):
        table.add_column(col, no_wrap=col in {"step", "fw", "size", "acc"})
    table.caption = (
        f"latency: median [95% CI of the median]; {NOISY_MARK}: the CI stayed wider than its target"
    )
    for row in rows:
        acc = row["accuracy"]
        table.add_row(
            str(row["index"]),
            row["step"],
            str(row["framework"] or "-"),
            _fmt_size(row["size_bytes"]),
            "-" if acc is None else f"{acc * 100:.2f}%",
            fmt_latency(row["latency_b1_ms"], row["latency_b1_ci95"], row["latency_b1_noisy"]),
            fmt_batch_latency(row, rows),
            row["verdict"] or "-",
        )
    return table


def step_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def run_with_progress(ws: Any, spec: Any, *, label: str, trust_pickle: bool = False) -> Any:
    from modules.core.step import reporting_progress

    with step_progress() as progress:
        task = progress.add_task(f"{label}: {spec.steps[0].name}", total=len(spec.steps))

        def advance(done: int, total: int, record: dict[str, Any]) -> None:
            nxt = spec.steps[done].name if done < total else "done"
            progress.update(task, completed=done, description=f"{label}: {nxt}")

        def detail(info: dict[str, Any]) -> None:
            # What the running step reports of itself, e.g. an int8 search's trial count.
            done = int(progress.tasks[0].completed)
            step = spec.steps[min(done, len(spec.steps) - 1)].name
            progress.update(task, description=f"{label}: {step} ({info.get('text', '')})")

        with reporting_progress(detail):
            return ws.run(spec, trust_pickle=trust_pickle, progress=advance)


@app.command()
@handles_errors
def steps(
    as_json: bool = typer.Option(False, "--json", help="Print JSON with params schemas."),
) -> None:
    """List the registered steps with their params schema."""
    from modules.core.registry import list_steps

    described = [s.describe() for s in list_steps()]
    if as_json:
        print(json.dumps(described, indent=2))
        return
    table = Table(title="Registered steps")
    for col in ("step", "accepts", "gate", "params", "summary"):
        table.add_column(col)
    for s in described:
        props = s["params_schema"].get("properties", {})
        table.add_row(
            s["name"],
            ",".join(s["accepts"]),
            "yes" if s["gate"] else "",
            ", ".join(props),
            s["summary"],
        )
    console.print(table)


@app.command()
@handles_errors
def profiles(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the built-in hardware profiles."""
    from modules.core.profiles import BUILTIN_PROFILES

    if as_json:
        print(json.dumps([p.model_dump() for p in BUILTIN_PROFILES.values()], indent=2))
        return
    table = Table(title="Hardware profiles")
    for col in (
        "name",
        "memory MB",
        "flash MB",
        "compute scale",
        "power W",
        "latency budget ms",
        "description",
    ):
        table.add_column(col)
    for p in BUILTIN_PROFILES.values():
        table.add_row(
            p.name,
            f"{p.memory_budget_mb:g}",
            "-" if p.flash_mb is None else f"{p.flash_mb:g}",
            f"{p.compute_scale:g}",
            f"{p.power_w:g}",
            "-" if p.latency_budget_ms is None else f"{p.latency_budget_ms:g}",
            p.description,
        )
    console.print(table)


# Options left unset take the step's own defaults: `mcaas steps --json` shows them.
PARAMS_HELP = "JSON object of any of the step's params (its schema: `mcaas steps --json`)."

# Options several commands share, written once.
DatasetOption = Annotated[str, typer.Option(help="Built-in name, a .npz file or an IDX directory.")]
TrustPickleOption = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow full pickled torch modules (unsafe).")
]
ParamsOption = Annotated[str | None, typer.Option("--params", help=PARAMS_HELP)]
ModelArchOption = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Architecture of a bare state_dict model file: resnet18, resnet34, resnet50, "
        "mobilenet_v2, vgg11, vgg16 (or another built-in arch), or a JSON arch like "
        '\'{"name":"resnet18","num_classes":10}\'.',
    ),
]


def step_params(given: dict[str, Any], params_json: str | None) -> dict[str, Any]:
    """`--params JSON` with the options given on top; unset options keep the step's defaults.

    The defaults, bounds and descriptions live in the step's params model only.
    """
    from modules.pipeline.script import parse_json_arg

    base = parse_json_arg(params_json, option="--params") or {}
    if not isinstance(base, dict):
        raise BadInputError(f"--params must be a JSON object, got {params_json!r}")
    return {**base, **{k: v for k, v in given.items() if v is not None}}


@app.command()
@handles_errors
def train(
    model: str | None = typer.Option(None, help="mlp | cnn | resnet | knn | rf | logreg"),
    arch: str | None = typer.Option(
        None, help='Torch zoo arch as JSON, e.g. \'{"name":"mlp","hidden":[64]}\'.'
    ),
    dataset: DatasetOption = "digits",
    output: Path = typer.Option(
        ..., help="Where to write the model (.pt for torch, .skops for sklearn)."
    ),
    epochs: int | None = typer.Option(None, help="Torch training epochs."),
    seed: int = typer.Option(0, help="Seed for the split and training."),
    params_json: ParamsOption = None,
) -> None:
    """Train a baseline model and write it in the safe format."""
    from modules.pipeline.local import run_single_step
    from modules.pipeline.script import parse_json_arg

    arch_value = None if arch is None else parse_json_arg(arch, option="--arch")
    params = step_params({"model": model, "epochs": epochs, "arch": arch_value}, params_json)
    record = run_single_step(
        "train", params, input_path=None, output_path=output, dataset=dataset, seed=seed
    )
    metrics = record.metrics
    console.print(
        f"wrote {output} ({record.output_size} bytes): test accuracy "
        f"{metrics['test_accuracy'] * 100:.2f}% on {dataset}"
    )


@app.command()
@handles_errors
def run(
    job_file: Path = typer.Argument(..., help="Job spec, YAML or JSON."),
    artifacts: Path = typer.Option(Path("artifacts"), help="Workspace directory."),
    trust_pickle: TrustPickleOption = False,
    arch: ModelArchOption = None,
) -> None:
    """Run a job spec in-process against a local workspace."""
    from modules.core.jobspec import parse_job_spec, read_job_file
    from modules.pipeline.local import LocalWorkspace
    from modules.storage.keys import inputs_key

    data = read_job_file(job_file)
    inputs_files = local_inputs(data, job_file=job_file)
    spec = parse_job_spec(data)
    model_path = resolve_model_path(spec.model, job_file=job_file)
    if arch is not None and model_path is None:
        raise BadInputError("--arch names the architecture of a local model file; the job has none")
    ws = LocalWorkspace(artifacts)  # only once the spec holds: a bad one writes nothing
    for inputs_id, blob in inputs_files.items():
        ws.store.put_bytes(inputs_key(spec.user_id, inputs_id), blob)
    if model_path is not None:
        key = ws.import_model(
            model_path, user_id=spec.user_id, trust_pickle=trust_pickle, arch=arch
        )
        spec = spec.model_copy(update={"model": key})
    elif spec.model is not None and not ws.store.exists(spec.model):
        raise NotFoundError(f"model {spec.model!r} is not in the workspace store {ws.store.root}")
    result = run_with_progress(ws, spec, label=spec.job_id, trust_pickle=trust_pickle)
    report_path = job_report_path(ws, result)
    from modules.evaluation.summary import summary_row

    console.print(
        summary_table(
            f"job {spec.job_id}: {result.status}", [summary_row(r) for r in result.records]
        )
    )
    if result.reason:
        console.print(f"reason: {result.reason}")
    console.print(f"report: {report_path}")
    if result.error is not None:
        raise result.error  # bad input found mid-job: exit 2 like any other bad input
    if result.status != "COMPLETED":
        raise typer.Exit(1)


def resolve_model_path(model: str | None, *, job_file: Path) -> Path | None:
    """A job's `model` as a local file (relative to the cwd, then to the job file), or None.

    None means the job names a store key (`users/...`) or has no input model.
    """
    if model is None or model.startswith("users/"):
        return None
    return local_file(model, job_file=job_file, what="model file")


def local_file(name: str, *, job_file: Path, what: str) -> Path:
    """A file named in a job spec: relative to the cwd, then to the job file."""
    for candidate in (Path(name), job_file.parent / name):
        if candidate.is_file():
            return candidate
    raise NotFoundError(f"{what} not found: {name}")


# Step params that name an inputs file by its id; `mcaas run` also takes a local .npz there.
INPUTS_PARAMS = ("inputs", "calibration_inputs")


def local_inputs(data: dict[str, Any], *, job_file: Path) -> dict[str, bytes]:
    """Name each local .npz in a step's inputs params by its id instead, the way a local
    `model:` file is imported (checked by the upload's reader); the files to store, by id."""
    from modules.storage.inputs import read_local_inputs

    files: dict[str, bytes] = {}
    for call in data.get("steps") or []:
        params = call.get("params") if isinstance(call, dict) else None
        if not isinstance(params, dict):
            continue
        for name in INPUTS_PARAMS:
            value = params.get(name)
            if isinstance(value, str) and value.endswith(".npz"):
                inputs_id, blob = read_local_inputs(
                    local_file(value, job_file=job_file, what="inputs file")
                )
                params[name], files[inputs_id] = inputs_id, blob
    return files


def job_report_path(ws: Any, result: Any) -> Path | None:
    """Where the engine stored the job's report.json in the workspace (None: it has none)."""
    if result.report_key is None:
        return None
    path: Path = ws.path_of(result.report_key)
    return path


def parse_values(text: str, *, option: str) -> list[Any]:
    """A JSON list ('[0.2, 0.5]') or comma-separated values ('0.2,0.5'; each read as JSON)."""
    from modules.errors import BadInputError
    from modules.pipeline.script import parse_json_arg

    stripped = text.strip()
    if stripped.startswith("["):
        values = parse_json_arg(stripped, option=option)
    else:
        values = []
        for part in (p.strip() for p in stripped.split(",")):
            try:
                values.append(json.loads(part))
            except json.JSONDecodeError:
                values.append(part)  # a bare word such as a method name
    if not isinstance(values, list) or not values or any(v == "" for v in values):
        raise BadInputError(f"{option} must be a non-empty list of values, got {text!r}")
    return values


def _fmt_num(value: Any, digits: int = 3) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def tradeoff_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """Candidates of a sweep or auto run: size, accuracy, latency (CI), energy, Pareto."""
    from modules.evaluation.summary import fmt_latency

    table = Table(title=title)
    for col in (
        "candidate",
        "size",
        "accuracy",
        "b1 ms median [95% CI]",
        "est. energy mJ",
        "Pareto",
        "note",
    ):
        table.add_column(col)
    for row in rows:
        acc = row.get("accuracy")
        note = row.get("error") or "; ".join(row.get("violations") or []) or ""
        table.add_row(
            str(row.get("label")),
            _fmt_size(row.get("size_bytes")),
            "-" if acc is None else f"{acc * 100:.2f}%",
            fmt_latency(row.get("latency_ms"), row.get("latency_ci95")),
            _fmt_num(row.get("energy_mj_estimate"), 4),
            "*" if row.get("pareto") else "",
            ("best; " if row.get("best") else "") + note,
        )
    return table


@app.command()
@handles_errors
def sweep(
    model: Path = typer.Option(..., "--model", help="Model file (.pt, .pt2, .skops or .onnx)."),
    step: str | None = typer.Option(None, help="Step to sweep, e.g. prune_structured."),
    param: str | None = typer.Option(None, help="Param of that step to vary, e.g. amount."),
    values: str | None = typer.Option(None, help="Values: '0,0.2,0.5' or a JSON list."),
    base_params: str | None = typer.Option(None, help="JSON object of the step's fixed params."),
    memory_budgets: str | None = typer.Option(
        None, help="Hardware-budget sweep: memory budgets in MB, e.g. '0.25,1,8'."
    ),
    compute_scales: str | None = typer.Option(
        None, help="Hardware-budget sweep: compute scales, e.g. '0.1,0.5,1'."
    ),
    dataset: DatasetOption = "digits",
    profile: str = typer.Option(DEFAULT_PROFILE, help="Hardware profile."),
    seed: int = typer.Option(0, help="Seed."),
    repeats: int | None = typer.Option(None, help="Runs per value (mean, std, 95% CI)."),
    out: Path = typer.Option(Path("artifacts/sweeps"), help="Workspace for tables and plots."),
    trust_pickle: TrustPickleOption = False,
    arch: ModelArchOption = None,
    params_json: str | None = typer.Option(
        None, "--params", help="JSON object of the sweep (or budget_sweep) step's other params."
    ),
) -> None:
    """Sweep one step param (trade-off table + Pareto front), or memory budgets x scales."""
    from modules.errors import BadInputError
    from modules.pipeline.local import LocalWorkspace, run_single_step
    from modules.pipeline.script import parse_json_arg

    params: dict[str, Any]
    if step is not None or param is not None or values is not None:
        if step is None or param is None or values is None:
            raise BadInputError("a step sweep needs --step, --param and --values together")
        if memory_budgets is not None or compute_scales is not None:
            raise BadInputError("give a step sweep or a budget sweep, not both")
        name = "sweep"
        given = {
            "step": step,
            "param": param,
            "values": parse_values(values, option="--values"),
            "base_params": parse_json_arg(base_params, option="--base-params"),  # None if unset
            "repeats": repeats,
        }
    elif memory_budgets is not None or compute_scales is not None:
        name = "budget_sweep"
        given = {
            "memory_budgets_mb": None
            if memory_budgets is None
            else parse_values(memory_budgets, option="--memory-budgets"),
            "compute_scales": None
            if compute_scales is None
            else parse_values(compute_scales, option="--compute-scales"),
        }
    else:
        raise BadInputError(
            "nothing to sweep: give --step/--param/--values, or --memory-budgets and/or "
            "--compute-scales"
        )
    params = step_params(given, params_json)
    ws = LocalWorkspace(out)
    record = run_single_step(
        name,
        params,
        input_path=model,
        input_arch=arch,
        output_path=None,
        dataset=dataset,
        profile=profile,
        seed=seed,
        trust_pickle=trust_pickle,
        workspace=out,
    )
    rows = record.metrics["rows"]
    if name == "sweep":
        console.print(tradeoff_table(f"sweep {step}.{param} on {profile}", rows))
        console.print(f"Pareto front: {', '.join(record.metrics['pareto_front'])}")
    else:
        table = Table(title=f"hardware-budget sweep (estimates; power of {profile})")
        for col in ("memory MB", "compute scale", "fits", "auto-batch", "est. b1 ms", "mJ/inf"):
            table.add_column(col)
        for row in rows:
            table.add_row(
                f"{row['memory_budget_mb']:g}",
                f"{row['compute_scale']:g}",
                "yes" if row["fits"] else "NO",
                str(row["auto_batch"] or "-"),
                _fmt_num(row["estimated_latency_ms"]),
                _fmt_num(row["energy_mj_estimate"], 4),
            )
        console.print(table)
    for file_name, key in sorted(record.files.items()):
        if not file_name.endswith(".svg"):
            console.print(f"{file_name}: {ws.path_of(key)}", soft_wrap=True)


@app.command()
@handles_errors
def auto(
    model: Path = typer.Option(..., "--model", help="Model file (.pt, .pt2, .skops or .onnx)."),
    profile: str = typer.Option(DEFAULT_PROFILE, help="Hardware profile the result must fit."),
    max_drop: float | None = typer.Option(
        None, help="Largest accuracy drop (points, or % if relative)."
    ),
    drop_kind: str | None = typer.Option(None, help="absolute (points) | relative (%)."),
    objective: str | None = typer.Option(None, help="Minimize: size | latency | energy."),
    search: str | None = typer.Option(
        None,
        help='JSON list of search spaces, e.g. \'[{"step":"prune_structured",'
        '"grid":{"amount":[0.3,0.6]}}]\'; default: one for the model kind.',
    ),
    max_trials: int | None = typer.Option(None, help="Most candidates tried."),
    max_time: float | None = typer.Option(
        None, help="No new trial starts after this many seconds."
    ),
    dataset: DatasetOption = "digits",
    seed: int = typer.Option(0, help="Seed."),
    output: Path | None = typer.Option(None, help="Where to write the best model."),
    out: Path = typer.Option(Path("artifacts/auto"), help="Workspace for tables and plots."),
    trust_pickle: TrustPickleOption = False,
    arch: ModelArchOption = None,
    params_json: ParamsOption = None,
) -> None:
    """Accuracy-aware search: the best compression within the profile and the accuracy drop."""
    from modules.pipeline.local import LocalWorkspace, run_single_step
    from modules.pipeline.script import parse_json_arg

    given = {
        "max_drop": max_drop,
        "drop_kind": drop_kind,
        "objective": objective,
        "max_trials": max_trials,
        "max_time_s": max_time,
        "search": None if search is None else parse_json_arg(search, option="--search"),
    }
    params = step_params(given, params_json)
    ws = LocalWorkspace(out)
    record = run_single_step(
        "auto",
        params,
        input_path=model,
        input_arch=arch,
        output_path=output,
        dataset=dataset,
        profile=profile,
        seed=seed,
        trust_pickle=trust_pickle,
        workspace=out,
    )
    metrics = record.metrics
    objective_used = params.get("objective", "size")
    console.print(
        tradeoff_table(f"auto on {profile} (objective: {objective_used})", metrics["rows"])
    )
    verdict = "met the budget: " if metrics["met_budget"] else "budget NOT met: "
    console.print(verdict + metrics["reason"])
    console.print(f"stopped by: {metrics['stopped_by']} after {metrics['n_trials']} trials")
    best = output if output is not None else ws.path_of(record.output_key or "")
    console.print(f"best model: {best}", soft_wrap=True)
    for file_name, key in sorted(record.files.items()):
        if not file_name.endswith(".svg"):
            console.print(f"{file_name}: {ws.path_of(key)}", soft_wrap=True)


COMPRESS_FILES = ("report.html", "deployment_report.json", "compress.json")


@contextlib.contextmanager
def candidate_progress(label: str) -> Iterator[Progress]:
    """A bar that follows a search candidate by candidate, while a step body runs in it.

    Each report the step makes (`report_progress`, with `phase`, `done`, `total` and `text`)
    moves the bar to `done`/`total` of its phase and prints the candidate's line above it,
    so the candidates scroll by as they finish.
    """
    from modules.core.step import reporting_progress

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} candidates"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"{label}: starting", total=None)

        def moved(info: dict[str, Any]) -> None:
            text = str(info.get("text", ""))
            done, total = info.get("done"), info.get("total")
            if isinstance(done, int) and isinstance(total, int) and total > 0:
                phase = info.get("phase", "")
                progress.update(task, completed=done, total=total, description=f"{label}: {phase}")
            if text:
                progress.console.print(f"  {text}", highlight=False, markup=False)

        with reporting_progress(moved):
            yield progress


@app.command()
@handles_errors
def compress(
    model: Path = typer.Argument(..., help="Model file (.pt or .skops)."),
    profile: str = typer.Option(DEFAULT_PROFILE, help="Hardware profile the result must fit."),
    max_drop: float | None = typer.Option(
        None, help="Largest accuracy drop (points, or % if relative)."
    ),
    drop_kind: str | None = typer.Option(None, help="absolute (points) | relative (%)."),
    objective: str | None = typer.Option(None, help="Minimize: size | latency | energy."),
    max_time: float | None = typer.Option(
        None, help="No new candidate starts after this many seconds."
    ),
    dataset: DatasetOption = "digits",
    seed: int = typer.Option(0, help="Seed."),
    output: Path = typer.Option(..., help="Directory for model.onnx, the reports and more."),
    trust_pickle: TrustPickleOption = False,
    params_json: ParamsOption = None,
) -> None:
    """Compress to a budget: a chained search handing back a parity-gated ONNX model."""
    import tempfile

    from modules.pipeline.local import LocalWorkspace, run_single_step, write_atomic

    if output.exists() and not output.is_dir():
        raise BadInputError(f"--output {output} is a file; give a directory")
    given = {
        "max_drop": max_drop,
        "drop_kind": drop_kind,
        "objective": objective,
        "max_time_s": max_time,
    }
    params = step_params(given, params_json)
    with (
        tempfile.TemporaryDirectory(prefix="mcaas-compress-") as tmp,
        candidate_progress(f"compress on {profile}"),
    ):
        work = Path(tmp)
        record = run_single_step(
            "compress",
            params,
            input_path=model,
            output_path=None,
            dataset=dataset,
            profile=profile,
            seed=seed,
            trust_pickle=trust_pickle,
            workspace=work,
        )
        ws = LocalWorkspace(work)
        met = not record.rejected
        blobs: dict[str, bytes] = {}
        # model.onnx only ever holds a winner that passed parity and the budget.
        if record.output_key and record.output_key.endswith(".onnx"):
            blobs["model.onnx" if met else "best_so_far.onnx"] = ws.store.get_bytes(
                record.output_key
            )
        for file_name, key in sorted(record.files.items()):
            if file_name in COMPRESS_FILES or file_name.startswith("native_model"):
                target = file_name.replace("native_model", "model" if met else "best_so_far")
                blobs[target] = ws.store.get_bytes(key)
    output.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, blob in blobs.items():
        written[name] = output / name
        write_atomic(output / name, blob)
    metrics = record.metrics
    console.print(tradeoff_table(f"compress on {profile}", metrics["rows"]))
    console.print(("goal met: " if met else "REJECTED: ") + metrics["reason"])
    console.print(
        f"{metrics['n_candidates']} candidates, {metrics['n_gated']} through the ONNX gate, "
        f"stopped by {metrics['stopped_by']} after {metrics['elapsed_s']:.1f} s"
    )
    for name, path in written.items():
        console.print(f"{name}: {path}", soft_wrap=True)
    if not met:
        raise typer.Exit(1)


def _share_cell(share: Any, ci: Any = None) -> str:
    if not isinstance(share, int | float):
        return "-"
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(c, int | float) for c in ci):
        return f"{share * 100:.1f}% [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"
    return f"{share * 100:.1f}%"


def profile_table(title: str, rows: list[dict[str, Any]], totals: dict[str, Any]) -> Table:
    """The per-layer profile as a rich table (torch layers or scikit-learn parts)."""
    from modules.evaluation.summary import fmt_latency

    table = Table(title=title)
    if totals.get("framework") == "torch":
        columns = (
            "layer",
            "type",
            "params (share)",
            "non-zero",
            "FLOPs (share)",
            "act. KB",
            "ms median [95% CI]",
            "latency share [95% CI]",
        )
        for col in columns:
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["name"],
                r["type"],
                f"{r['params']} ({_share_cell(r['params_share'])})",
                str(r["nonzero_params"]),
                f"{r['flops']} ({_share_cell(r['flops_share'])})",
                f"{r['activation_bytes'] / 1e3:.2f}",
                fmt_latency(r["latency_ms"], r["latency_ci95"]),
                _share_cell(r["latency_share"], r["latency_share_ci95"]),
            )
        return table
    extra = [k for k in ("stored_samples", "nodes", "leaves", "depth") if any(k in r for r in rows)]
    for col in ("part", "type", *extra, "numbers (share)", "bytes (share)"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["type"],
            *(str(r.get(k, "-")) for k in extra),
            f"{r['params']} ({_share_cell(r['params_share'])})",
            f"{r['bytes']} ({_share_cell(r['bytes_share'])})",
        )
    return table


@app.command("profile")
@handles_errors
def profile_cmd(
    input_model: Path = typer.Option(
        ..., "--input-model", help="Model file (.pt, .pt2, .skops or .onnx)."
    ),
    dataset: DatasetOption = "digits",
    batch_size: int | None = typer.Option(
        None, help="Rows per forward (FLOPs, activations, latency)."
    ),
    warmup: int | None = typer.Option(None, help="Untimed forwards before timing."),
    runs: int | None = typer.Option(None, help="Timed forwards."),
    seed: int = typer.Option(0, help="Seed (dataset split)."),
    as_json: bool = typer.Option(False, "--json", help="Print the table and totals as JSON."),
    out: Path = typer.Option(Path("artifacts/profile"), help="Workspace for profile.csv."),
    trust_pickle: TrustPickleOption = False,
    arch: ModelArchOption = None,
    params_json: ParamsOption = None,
) -> None:
    """Per-layer profile: params, FLOPs, activation memory and latency share, with totals."""
    from modules.evaluation.summary import fmt_latency
    from modules.pipeline.local import LocalWorkspace, run_single_step

    ws = LocalWorkspace(out)
    record = run_single_step(
        "profile",
        step_params({"batch_size": batch_size, "warmup": warmup, "runs": runs}, params_json),
        input_path=input_model,
        input_arch=arch,
        output_path=None,
        dataset=dataset,
        seed=seed,
        trust_pickle=trust_pickle,
        workspace=out,
    )
    metrics = record.metrics
    rows, totals = metrics["layers"], metrics["totals"]
    csv_path = ws.path_of(record.files["profile.csv"])
    if as_json:
        print(json.dumps({"layers": rows, "totals": totals, "csv": str(csv_path)}))
        return
    console.print(profile_table(f"profile of {input_model.name} on {dataset}", rows, totals))
    if totals.get("framework") == "torch":
        fwd = totals["forward_ms"]
        console.print(
            f"total: {totals['params']} params, {totals['flops']} FLOPs at batch "
            f"{totals['batch_size']}, forward {fmt_latency(fwd['median'], fwd['median_ci95'])} ms "
            f"with hooks ({totals['threads']} threads); not in any layer: "
            f"{_share_cell(totals['other_share'])} of the time"
        )
    else:
        console.print(f"total: {totals['params']} numbers, {totals['bytes']} bytes")
    console.print(totals["latency_note"], style="dim")
    console.print(f"profile.csv: {csv_path}", soft_wrap=True)


DEMO_JOBS: list[dict[str, Any]] = [
    {
        # The main job: baseline -> compress -> measure -> ONNX -> int8 -> parity gate ->
        # hardware simulation -> report.
        "job_id": "demo-mlp",
        "steps": [
            {"name": "train", "params": {"model": "mlp", "epochs": 30}},
            {
                "name": "prune_structured",
                "params": {"method": "structured", "amount": 0.5, "finetune_epochs": 10},
            },
            {"name": "measure", "params": {}},
            {"name": "onnx_export", "params": {}},
            {"name": "onnx_quantize", "params": {"mode": "dynamic"}},
            {"name": "onnx_parity", "params": {"min_agreement": 0.98, "max_prob_diff": 0.05}},
            {"name": "hardware_sim", "params": {}},
            {"name": "report", "params": {"title": "MCaaS demo: pruned MLP on digits"}},
        ],
    },
    {
        "job_id": "demo-knn",
        "steps": [
            {"name": "train", "params": {"model": "knn"}},
            {"name": "knn_prototypes", "params": {"method": "kmeans", "ratio": 0.05}},
            {"name": "measure", "params": {}},
            {"name": "onnx_export", "params": {}},
            {"name": "onnx_parity", "params": {"min_agreement": 0.98, "max_prob_diff": 0.05}},
            {"name": "hardware_sim", "params": {}},
            {"name": "report", "params": {"title": "MCaaS demo: prototype KNN on digits"}},
        ],
    },
]


def report_html_of(ws: Any, records: list[StepRecord]) -> Path | None:
    """Where the report step of these records wrote report.html, if one ran."""
    for record in reversed(records):
        key = record.files.get("report.html")
        if key:
            return Path(ws.path_of(key))
    return None


def demo_index_html(entries: list[tuple[str, str, Path | None]], *, root: Path) -> str:
    """An index page linking each demo job's report.html (relative links: works from disk)."""
    import html
    import os

    items = []
    for job_id, status, path in entries:
        link = (
            f'<a href="{html.escape(os.path.relpath(path, root))}">report.html</a>'
            if path
            else "no report"
        )
        items.append(f"<li>{html.escape(job_id)}: {html.escape(status)} &mdash; {link}</li>")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>MCaaS demo</title>'
        "</head><body><h1>MCaaS demo</h1><ul>" + "".join(items) + "</ul></body></html>"
    )


@app.command()
@handles_errors
def demo(
    out: Path = typer.Option(
        Path("artifacts"), help="Where artifacts, steps.csv and report.json go."
    ),
    profile: str = typer.Option(DEFAULT_PROFILE, help="Hardware profile."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Run the whole pipeline in-process on digits with local storage and a CSV log."""
    from modules.core.jobspec import parse_job_spec
    from modules.evaluation.summary import summary_row
    from modules.pipeline.local import LocalWorkspace, write_atomic

    start = time.perf_counter()
    ws = LocalWorkspace(out)
    reports = []
    html_reports: list[tuple[str, str, Path | None]] = []
    for job in DEMO_JOBS:
        spec = parse_job_spec({**job, "profile": profile, "seed": seed, "dataset": "digits"})
        if ws.jobs.get(spec.job_id) is not None:
            # A rerun of the demo starts clean: step records are idempotent per job id.
            spec = spec.model_copy(update={"job_id": f"{spec.job_id}-{int(time.time())}"})
        result = run_with_progress(ws, spec, label=spec.job_id)
        job_report = job_report_path(ws, result)
        if job_report is not None:
            reports.append(json.loads(job_report.read_bytes()))
        console.print(
            summary_table(
                f"{spec.job_id}: {result.status.value}", [summary_row(r) for r in result.records]
            )
        )
        if result.reason:
            console.print(f"reason: {result.reason}")
        job_html = report_html_of(ws, result.records)
        html_reports.append((spec.job_id, result.status.value, job_html))
        if job_html is not None:
            console.print(f"{spec.job_id} report: {job_html.resolve()}", soft_wrap=True)
    report_path = out / "report.json"
    write_atomic(report_path, json.dumps({"jobs": reports}, indent=2).encode())
    index_path = out / "report.html"
    write_atomic(index_path, demo_index_html(html_reports, root=out).encode())
    console.print(f"step log: {ws.log.path}")
    console.print(f"report: {report_path.resolve()}")
    console.print(f"report.html: {index_path.resolve()}", soft_wrap=True)
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    if any(r["status"] != "COMPLETED" for r in reports):
        raise typer.Exit(1)


# --- `mcaas submit`: a client of the REST API ------------------------------------------------

TERMINAL_STATUSES = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}
FOLLOW_RECONNECTS = 5


class ApiError(McaasError):
    """The API refused a request or could not be reached; the message says which and why."""

    code = "api"


def _api_call(client: Any, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach the API at {client.base_url}: {exc}") from None
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            detail = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            detail = response.text[:200]
        raise ApiError(f"{method} {path} answered {response.status_code} ({detail})")
    return response.json()


def sse_frames(lines: Any) -> Any:
    """(event, data) pairs from Server-Sent Events lines; comments and retry lines skipped."""
    event = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def follow_job(client: Any, job_id: str) -> dict[str, Any]:
    """Show a progress bar fed by GET /v1/jobs/{id}/events until the job ends; its last event."""
    import httpx

    last: dict[str, Any] = {}
    with step_progress() as progress:
        task = progress.add_task(f"{job_id}: queued", total=None)
        for _ in range(FOLLOW_RECONNECTS):
            try:
                with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(
                            f"GET /v1/jobs/{job_id}/events answered {response.status_code}"
                            f" ({response.text[:200]})"
                        )
                    for kind, event in sse_frames(response.iter_lines()):
                        last = event
                        doing = event.get("current_step") or event["status"].lower()
                        if event.get("detail"):
                            doing += f" ({event['detail']})"
                        progress.update(
                            task,
                            total=event["total"],
                            completed=event["done"],
                            description=f"{job_id}: {doing}",
                        )
                        if kind == "end":
                            return last
            except httpx.HTTPError:
                time.sleep(1.0)  # the stream dropped (restart, proxy): reconnect
    job: dict[str, Any] = _api_call(client, "GET", f"/v1/jobs/{job_id}")
    if job["status"] not in TERMINAL_STATUSES:
        raise ApiError(f"lost the event stream of job {job_id} ({job['status']}); try again")
    return {"status": job["status"], "reason": job.get("reason")}


def _job_body(
    *, job_file: Path | None, preset: str | None, profile: str, dataset: str, seed: int
) -> dict[str, Any]:
    from modules.pipeline.presets import get_preset

    if preset is not None and job_file is None:
        steps = get_preset(preset).step_calls()
        return {"steps": steps, "profile": profile, "dataset": dataset, "seed": seed}
    if job_file is None or preset is not None:
        raise BadInputError("give exactly one of --preset NAME and --job FILE")
    import yaml

    try:
        body = yaml.safe_load(job_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(f"cannot read job file {job_file}: {exc}") from None
    if not isinstance(body, dict) or "steps" not in body:
        raise BadInputError(f"job file {job_file} must be a mapping with a `steps` list")
    return {"profile": profile, "dataset": dataset, "seed": seed, **body}


@app.command()
@handles_errors
def submit(
    model: Path | None = typer.Argument(
        None, help="Model file to upload (.pt/.pth, .pt2, .skops, .onnx); omit with --model-id."
    ),
    arch: ModelArchOption = None,
    preset: str | None = typer.Option(None, "--preset", help="A preset pipeline by name."),
    job_file: Path | None = typer.Option(
        None, "--job", help="JSON/YAML job spec (steps, profile, dataset, seed, repeats)."
    ),
    model_id: str | None = typer.Option(None, "--model-id", help="A model uploaded before."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help="Hardware profile name."),
    dataset: str = typer.Option("digits", "--dataset", help="Built-in dataset name."),
    seed: int = typer.Option(0, "--seed", help="Seed for splits and training."),
    follow: bool = typer.Option(False, "--follow", help="Show live progress until the job ends."),
    api_url: str = typer.Option(
        "http://127.0.0.1:8000", "--api-url", envvar="MCAAS_API_URL", help="The MCaaS API."
    ),
    api_key: str = typer.Option(
        ..., "--api-key", envvar="MCAAS_API_KEY", help="Your API key.", show_default=False
    ),
) -> None:
    """Upload a model and start a job on a running API; --follow shows its progress.

    Exit 0 when the job completes (or, without --follow, is queued), 1 when it is rejected,
    fails or is stopped, 2 on bad input or an API error.
    """
    import httpx

    body = _job_body(job_file=job_file, preset=preset, profile=profile, dataset=dataset, seed=seed)
    if model is not None and model_id is not None:
        raise BadInputError("give a model file or --model-id, not both")
    if arch is not None and model is None:
        raise BadInputError("--arch names the architecture of the model file to upload")
    timeout = httpx.Timeout(30.0, read=120.0)  # read > the stream's 15 s keep-alive
    headers = {"X-API-Key": api_key}
    with httpx.Client(base_url=api_url, headers=headers, timeout=timeout) as client:
        if model is not None:
            if not model.is_file():
                raise BadInputError(f"model file {model} does not exist")
            with open(model, "rb") as handle:
                uploaded = _api_call(
                    client,
                    "POST",
                    "/v1/models",
                    files={"file": (model.name, handle)},
                    data=None if arch is None else {"arch": arch},
                )
            model_id = uploaded["id"]
            err_console.print(f"uploaded {model.name} as model {model_id}", highlight=False)
        if model_id is not None:
            body["model_id"] = model_id
        job = _api_call(client, "POST", "/v1/jobs", json=body)
        if not follow:
            console.print_json(json.dumps({"id": job["id"], "status": job["status"]}))
            return
        final = follow_job(client, job["id"])
        if final["status"] == "COMPLETED":
            from modules.evaluation.summary import summary_row

            records = _api_call(client, "GET", f"/v1/jobs/{job['id']}")["records"] or []
            rows = [summary_row(r) for r in records]
            console.print(summary_table(f"job {job['id']}: COMPLETED", rows))
            return
    reason = final.get("reason") or "no reason given"
    err_console.print(f"job {job['id']} {final['status']}: {reason}", highlight=False)
    raise typer.Exit(1)


def main() -> None:
    app(prog_name="mcaas")


if __name__ == "__main__":
    main()
