"""The dashboard in a real headless Chromium against uvicorn + a Celery worker: log in, upload
a model, start a job, watch the live progress reach 100%, check the table, plots and report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ALICE_KEY = "dev-key-alice-0001"
PRESET_STEPS = ["measure", "prune_structured", "measure", "report"]  # the quick-prune preset
JOB_TIMEOUT_S = 120


def wait(driver: Any, condition: Any, *, timeout: float = 30, message: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def loaded_images(driver: Any, selector: str) -> list[int]:
    """naturalWidth of each image matching `selector` once all have finished loading."""
    script = (
        "const imgs = Array.from(document.querySelectorAll(arguments[0]));"
        "return imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;"
    )
    return wait(driver, lambda d: d.execute_script(script, selector), message=selector)


def test_log_in_upload_watch_progress_and_open_the_report(
    service, browser, torch_model_bytes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    base = service.stack.api_url
    driver.get(f"{base}/ui/jobs")
    assert "/ui/login" in driver.current_url
    driver.find_element(By.ID, "api_key").send_keys(ALICE_KEY)
    driver.find_element(By.ID, "login").click()
    # The login form's own URL (/ui/login?next=/ui/jobs) also ends in /ui/jobs: wait for the
    # redirect to the jobs page itself, or the next page load can race the session cookie.
    wait(driver, lambda d: d.current_url == f"{base}/ui/jobs", message="login")
    assert driver.get_cookie("mcaas_session") is not None

    model_path = tmp_path / "mlp.pt"
    model_path.write_bytes(torch_model_bytes)
    driver.get(f"{base}/ui/upload")
    driver.find_element(By.ID, "file").send_keys(str(model_path))
    Select(driver.find_element(By.ID, "new-preset")).select_by_value("quick-prune")
    Select(driver.find_element(By.ID, "new-profile")).select_by_value("edge-8mb")
    driver.find_element(By.ID, "start").click()
    wait(driver, lambda d: re.search(r"/ui/jobs/[0-9a-f]+$", d.current_url), message="job page")
    job_id = driver.current_url.rsplit("/", 1)[-1]

    root = driver.find_element(By.ID, "job")

    def finished(d: Any) -> bool:
        return root.get_attribute("data-status") in {"COMPLETED", "FAILED", "REJECTED"}

    wait(driver, finished, timeout=JOB_TIMEOUT_S, message="job end")
    assert root.get_attribute("data-status") == "COMPLETED", driver.find_element(
        By.ID, "job-reason"
    ).text
    assert driver.find_element(By.ID, "progress").get_attribute("value") == "100"
    assert driver.find_element(By.ID, "progress-label").text.startswith("100%")
    # The page was updated live over SSE (not by a reload, not by polling).
    assert root.get_attribute("data-transport") == "sse"
    assert int(root.get_attribute("data-events")) >= 1
    states = [
        li.get_attribute("data-state")
        for li in driver.find_elements(By.CSS_SELECTOR, "#timeline li")
    ]
    assert states == ["done"] * len(PRESET_STEPS)

    # The results fragment is refreshed at the end: one row per step, every plot drawn. The
    # page says which state its table shows; read the rows in one script, never element by
    # element across a refresh.
    final = f"COMPLETED:{len(PRESET_STEPS)}"
    wait(driver, lambda d: root.get_attribute("data-results-for") == final, message="results")
    steps = driver.execute_script(
        "return Array.from(document.querySelectorAll('#steps tbody tr'))"
        ".map(r => r.querySelectorAll('td')[1].innerText);"
    )
    assert steps == PRESET_STEPS
    widths = loaded_images(driver, "img.plot")
    assert len(widths) == 3
    assert all(w > 0 for w in widths), widths
    assert driver.find_elements(By.CSS_SELECTOR, "#artifacts a")
    screenshot = tmp_path / "job.png"
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

    driver.find_element(By.ID, "report-link").click()
    wait(driver, lambda d: d.current_url.endswith(f"/ui/jobs/{job_id}/report"), message="report")
    report_widths = loaded_images(driver, "img")
    assert report_widths and all(w > 0 for w in report_widths), report_widths
    step_cells = driver.execute_script(
        "const t = Array.from(document.querySelectorAll('table'))"
        ".find(t => t.innerText.includes('batch-1 latency'));"
        "return Array.from(t.querySelectorAll('tr')).slice(1)"
        ".map(r => r.querySelectorAll('td')[1].innerText);"
    )
    # The report step lists the steps before it, then its own row.
    assert step_cells == PRESET_STEPS
    driver.save_screenshot(str(tmp_path / "report.png"))

    driver.get(f"{base}/ui/jobs")
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]')
    assert "COMPLETED" in row.text
    assert "mlp.pt" in row.text
    assert re.search(r"\d+\.\d\dx", row.text), row.text  # size reduction
