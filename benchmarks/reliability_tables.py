"""Render the hostile-input table of benchmarks/results/reliability.md from the tests' figures.

The hostile-input tests write what each specimen got as JSON when
``MCAAS_RELIABILITY_DIR`` is set (``hostile_api.json``, ``hostile_cli_models.json``,
``hostile_cli_jobspecs.json``). This script turns them into the section
"## Hostile inputs tried and rejected" and replaces that section in the results file,
so the table always says what the tests last saw rather than what was typed in by hand.

    MCAAS_RELIABILITY_DIR=/tmp/rel .venv/bin/pytest -m "slow or not slow" tests/integration/hostile
    .venv/bin/python -m benchmarks.reliability_tables /tmp/rel
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "reliability.md"
HEADING = "## Hostile inputs tried and rejected"


def _load(folder: Path, name: str) -> list[dict[str, Any]]:
    path = folder / name
    if not path.is_file():
        raise SystemExit(
            f"{path} is missing: run the hostile-input tests with MCAAS_RELIABILITY_DIR={folder}"
        )
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise SystemExit(f"{path}: expected a JSON list of rows")
    return rows


def _cli_cell(name: str, models: dict[str, dict[str, Any]], jobs: dict[str, dict[str, Any]]) -> str:
    if name in models:
        row = models[name]
        return f"exit {row['exit']} x{row['loaders']}"
    if name in jobs:
        return f"exit {jobs[name]['exit']} (`mcaas run`)"
    return "—"


def render(folder: Path) -> str:
    """The hostile-input section, from the JSON figures in ``folder``."""
    api = _load(folder, "hostile_api.json")
    models = {row["name"]: row for row in _load(folder, "hostile_cli_models.json")}
    jobs = {row["name"]: row for row in _load(folder, "hostile_cli_jobspecs.json")}
    order: list[str] = []
    specimens: dict[str, dict[str, Any]] = {}
    for row in api:
        entry = specimens.setdefault(row["name"], {"what": row["what"], "codes": [], "ok": True})
        entry["ok"] = entry["ok"] and 400 <= int(row["status"]) < 500
        if row["name"] not in order:
            order.append(row["name"])
        code = f"{row['status']} {row['code']}"
        if code not in entry["codes"]:
            entry["codes"].append(code)
    for name, row in list(models.items()) + list(jobs.items()):
        if name not in specimens:
            specimens[name] = {"what": row["what"], "codes": [], "ok": True}
            order.append(name)
        specimens[name]["ok"] = specimens[name]["ok"] and row["exit"] == 2
    refused = sum(1 for row in api if 400 <= int(row["status"]) < 500)
    rejected = sum(1 for name in order if specimens[name]["ok"])
    lines = [
        f"{HEADING}: {rejected} of {len(order)}",
        "",
        "Every file went to `POST /v1/models` under its own name and again renamed `model.pt`",
        "(content sniffing); datasets to `POST /v1/datasets`; job specs to `POST /v1/jobs`;",
        "model files to `load_model_file`, a technique script (`quantize_dynamic`, in-process",
        'and as a subprocess) and `mcaas run` ("exit 2 x3"); job specs to `mcaas run`.',
        f"{len(api)} API attempts: {refused} clean 4xx JSON errors, each logged by the API",
        "(`refused POST /v1/models: 422 unsafe_model: ...`), no body over 10 kB, no stack trace",
        "(all asserted by the tests). The marker file the payloads would create never appeared",
        "(the same payloads do create it when unpickled naively: `test_payloads_are_live`).",
        "Only the control upload was stored, under `users/alice/`. A job spec is 422",
        "`invalid_request` when it parses but fails validation, 400 `bad_input` when it cannot",
        "be parsed at all (nesting deeper than the parser's limit).",
        "",
        "| specimen | what | API | CLI |",
        "|---|---|---|---|",
    ]
    for name in order:
        entry = specimens[name]
        api_cell = ", ".join(entry["codes"]) or "—"
        lines.append(
            f"| `{name}` | {entry['what']} | {api_cell} | {_cli_cell(name, models, jobs)} |"
        )
    return "\n".join(lines) + "\n"


def splice(document: str, section: str) -> str:
    """``document`` with its hostile-input section replaced by ``section``."""
    start = document.find(HEADING)
    if start < 0:
        raise SystemExit(f"{RESULTS} has no '{HEADING}' section")
    end = document.find("\n## ", start + len(HEADING))
    tail = document[end + 1 :] if end >= 0 else ""
    return document[:start] + section + ("\n" + tail if tail else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the MCAAS_RELIABILITY_DIR the tests wrote to")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the file to update")
    args = parser.parse_args(argv)
    section = render(args.folder)
    args.results.write_text(splice(args.results.read_text(), section))
    print(section.splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
