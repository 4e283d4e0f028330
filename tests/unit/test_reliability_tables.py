"""The hostile-input table is rendered from the tests' JSON figures, never typed in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import reliability_tables


def _write(folder: Path, name: str, rows: list[dict[str, object]]) -> None:
    (folder / name).write_text(json.dumps(rows))


def _figures(folder: Path, *, jobspec_status: int = 422) -> None:
    _write(
        folder,
        "hostile_api.json",
        [
            {
                "name": "evil.pt",
                "what": "a pickle running os.system",
                "status": 422,
                "code": "unsafe_model",
            },
            {
                "name": "evil.pt",
                "what": "a pickle running os.system",
                "status": 422,
                "code": "unsafe_model",
            },
            {
                "name": "job_x",
                "what": "an unknown field",
                "status": jobspec_status,
                "code": "invalid_request",
            },
        ],
    )
    _write(
        folder,
        "hostile_cli_models.json",
        [{"name": "evil.pt", "what": "a pickle", "loaders": 3, "exit": 2}],
    )
    _write(
        folder,
        "hostile_cli_jobspecs.json",
        [
            {"name": "job_x", "what": "an unknown field", "exit": 2},
            {"name": "cli_only", "what": "only the CLI sees it", "exit": 2},
        ],
    )


def test_render_counts_specimens_and_attempts(tmp_path: Path) -> None:
    _figures(tmp_path)
    section = reliability_tables.render(tmp_path)
    assert section.startswith("## Hostile inputs tried and rejected: 3 of 3\n")
    assert "3 API attempts: 3 clean 4xx" in section
    assert "| `evil.pt` | a pickle running os.system | 422 unsafe_model | exit 2 x3 |" in section
    assert "| `job_x` | an unknown field | 422 invalid_request | exit 2 (`mcaas run`) |" in section
    assert "| `cli_only` | only the CLI sees it | — | exit 2 (`mcaas run`) |" in section


def test_a_5xx_is_not_counted_as_rejected(tmp_path: Path) -> None:
    _figures(tmp_path, jobspec_status=500)
    section = reliability_tables.render(tmp_path)
    assert section.startswith("## Hostile inputs tried and rejected: 2 of 3\n")
    assert "3 API attempts: 2 clean 4xx" in section


def test_splice_replaces_only_the_section() -> None:
    document = (
        "# R\n\n## Faults\nA\n\n## Hostile inputs tried and rejected: 1 of 1\nold\n\n## Load\nB\n"
    )
    out = reliability_tables.splice(document, "## Hostile inputs tried and rejected: 2 of 2\nnew\n")
    expected = "# R\n\n## Faults\nA\n\n## Hostile inputs tried and rejected: 2 of 2\nnew\n"
    assert out == expected + "\n## Load\nB\n"


def test_missing_figures_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="hostile_api.json is missing"):
        reliability_tables.render(tmp_path)
