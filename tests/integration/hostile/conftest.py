"""The hostile corpus (generated into the session's tmp dir) and an API process to throw it at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.devstack import DevStack, StackError

# Reuse the service suite's Redis fixture (Redis at REDIS_URL, or one started; never skipped).
from tests.integration.service.conftest import redis_url  # noqa: F401  (a fixture, by name)

UPLOAD_CAP_MB = "5"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def marker(corpus_dir: Path) -> Path:
    """The file every code-running payload would create; it must never exist."""
    return corpus_dir / "PWNED-MARKER"


@pytest.fixture(scope="session")
def corpus(corpus_dir: Path, marker: Path) -> list:
    from tests.corpus.make_corpus import build_corpus

    return build_corpus(corpus_dir / "files", marker)


@pytest.fixture(scope="session")
def hostile_stack(
    moto_endpoint: str,
    redis_url: str,  # noqa: F811  (the imported fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DevStack]:
    """The API as compose starts it (no worker needed: nothing hostile may get that far)."""
    stack = DevStack(
        tmp_path_factory.mktemp("hostile"), moto_url=moto_endpoint, redis_url=redis_url
    )
    stack.overrides["MCAAS_MAX_UPLOAD_MB"] = UPLOAD_CAP_MB
    # The whole corpus goes to one user within seconds; the rate limit has its own test.
    stack.overrides["MCAAS_UPLOADS_PER_MINUTE"] = "100000"
    try:
        stack.service_env()
        stack.start_api()
    except StackError as exc:
        stack.stop()
        pytest.fail(f"could not start the API: {exc}")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def api(hostile_stack: DevStack) -> Iterator[httpx.Client]:
    assert hostile_stack.api_url is not None
    with httpx.Client(base_url=hostile_stack.api_url, timeout=120) as client:
        yield client
