"""The service stack of tests/integration/service (moto, Redis, a Celery worker, uvicorn),
reused as is, plus a headless Chromium driven by selenium through the system chromedriver."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# The service tests' fixtures, reused rather than copied (pytest registers imported fixtures).
from tests.integration.service.conftest import (  # noqa: F401
    redis_url,
    service,
    torch_model_bytes,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1600",
)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Headless Chromium with a fresh profile; fails (never skips) when it is not installed."""
    for program in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(program) is None:
            pytest.fail(
                f"{program} not found: .ci/run installs Debian's chromium and chromium-driver"
            )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # The system chromedriver only: Selenium Manager must not try to download one.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
