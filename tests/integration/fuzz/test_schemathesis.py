"""Schemathesis against the running API's own OpenAPI schema, with an API key.

Bounded: FUZZ_EXAMPLES examples per operation (25 by default; MCAAS_FUZZ_EXAMPLES raises
it for a heavier run). The checks are the ones the issue asks for: no 5xx, and every
response (and its content type) conforms to the schema it documents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from tests.devstack import DevStack, StackError
from tests.integration.service.conftest import redis_url  # noqa: F401  (a fixture, by name)

pytestmark = pytest.mark.integration

ALICE = {"X-API-Key": "dev-key-alice-0001"}
FUZZ_EXAMPLES = int(os.environ.get("MCAAS_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def fuzz_api_url(
    moto_endpoint: str,
    redis_url: str,  # noqa: F811  (the imported fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The API as compose starts it; no worker (queued jobs just wait)."""
    stack = DevStack(tmp_path_factory.mktemp("fuzz"), moto_url=moto_endpoint, redis_url=redis_url)
    stack.overrides["MCAAS_MAX_UPLOAD_MB"] = "5"
    try:
        stack.service_env()
        url = stack.start_api()
    except StackError as exc:
        stack.stop()
        pytest.fail(f"could not start the API: {exc}")
    try:
        yield url
    finally:
        stack.stop()


def fuzz_operation(
    operation: Any, *, mode: GenerationMode, url: str, calls: list[int]
) -> str | None:
    """Run one operation's bounded examples; the failure text, or None when all checks pass."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same examples every run: a CI failure reproduces
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report, do not minimise
    )
    def run(case: schemathesis.Case) -> None:
        calls.append(1)
        case.call_and_validate(base_url=url, headers=ALICE, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:  # an operation without parameters has no invalid input to send
        return None
    except Exception as exc:  # a failed check, or a transport error: both are findings
        return f"{operation.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:1500]}"
    return None


def test_api_has_no_server_errors_and_keeps_its_schema(fuzz_api_url: str) -> None:
    # schemathesis's pytest plugin (from_fixture) does not run under pytest 9, so the
    # operations are driven through its Python API, one hypothesis test each.
    schema = schemathesis.openapi.from_url(f"{fuzz_api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    calls: list[int] = []
    failures = [
        failure
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if (failure := fuzz_operation(operation, mode=mode, url=fuzz_api_url, calls=calls))
        is not None
    ]
    out = os.environ.get("MCAAS_RELIABILITY_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        summary = {
            "operations": [op.label for op in operations],
            "examples_per_operation_and_mode": FUZZ_EXAMPLES,
            "requests": len(calls),
            "failures": failures,
        }
        (Path(out) / "fuzz.json").write_text(json.dumps(summary, indent=2))
    assert not failures, "\n\n".join(failures)
