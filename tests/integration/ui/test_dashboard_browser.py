"""The dashboard in a real headless Chromium against uvicorn + a Celery worker: log in, upload
a model, start a job, watch the live progress reach 100%, check the table, plots and report;
start a compress-to-budget search from the form and watch its candidates go by; follow a job
by polling when its event stream fails.

Waits are on page state (an element that only the expected page has, a data attribute the
page's script sets), never on timers or on URLs alone: under load a URL test can match the
page the browser is still leaving. Set MCAAS_SCREENSHOTS=DIR to keep the screenshots (the
docs' pictures are taken this way).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ALICE_KEY = "dev-key-alice-0001"
ALICE = {"X-API-Key": ALICE_KEY}
PRESET_STEPS = ["measure", "prune_structured", "measure", "report"]  # the quick-prune preset
JOB_TIMEOUT_S = 120
FINISHED = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}


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


def keep_screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    """Save a screenshot (and copy it to $MCAAS_SCREENSHOTS when that is set)."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    keep = os.environ.get("MCAAS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / name)
    return path


def log_in(driver: Any, base: str) -> None:
    """Log in as alice from the login form a dashboard page redirects to."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/ui/jobs")
    wait(driver, lambda d: d.find_elements(By.ID, "api_key"), message="login form")
    driver.find_element(By.ID, "api_key").send_keys(ALICE_KEY)
    driver.find_element(By.ID, "login").click()
    # Only a logged-in page has the logout form; the login page (whose URL also names
    # /ui/jobs, in ?next=) has not.
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "form.logout"), message="logged in")
    assert driver.get_cookie("mcaas_session") is not None


def open_job_page(driver: Any) -> Any:
    """After a form that starts a job was sent: wait for the job page; its #job element."""
    from selenium.webdriver.common.by import By

    wait(driver, lambda d: d.find_elements(By.ID, "job"), timeout=60, message="job page")
    return driver.find_element(By.ID, "job")


def wait_finished(driver: Any, root: Any) -> str:
    """The job's final status, as the page's script sets it from the events."""
    from selenium.webdriver.common.by import By

    wait(
        driver,
        lambda d: root.get_attribute("data-status") in FINISHED,
        timeout=JOB_TIMEOUT_S,
        message="job end",
    )
    status = root.get_attribute("data-status")
    assert status == "COMPLETED", driver.find_element(By.ID, "job-reason").text
    return str(status)


def newest_job(service: Any) -> str | None:
    """The id of alice's newest job on the stack, if she has one."""
    jobs = service.http.get("/v1/jobs", headers=ALICE, params={"limit": 1}).json()["data"]
    return jobs[0]["id"] if jobs else None


def fetch_in_page(driver: Any, href: str) -> list[int]:
    """[HTTP status, body bytes] of a same-origin GET made by the page (with its cookie)."""
    script = (
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'})"
        ".then(r => r.arrayBuffer().then(b => done([r.status, b.byteLength])))"
        ".catch(e => done([0, String(e)]));"
    )
    driver.set_script_timeout(60)
    result: list[int] = driver.execute_async_script(script, href)
    return result


def test_log_in_upload_watch_progress_and_open_the_report(
    service, browser, torch_model_bytes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    base = service.stack.api_url
    log_in(driver, base)
    assert driver.current_url == f"{base}/ui/jobs"  # back where the login was asked for

    model_path = tmp_path / "mlp.pt"
    model_path.write_bytes(torch_model_bytes)
    driver.get(f"{base}/ui/upload")
    driver.find_element(By.ID, "file").send_keys(str(model_path))
    Select(driver.find_element(By.ID, "new-preset")).select_by_value("quick-prune")
    Select(driver.find_element(By.ID, "new-profile")).select_by_value("edge-8mb")
    driver.find_element(By.ID, "start").click()
    root = open_job_page(driver)
    job_id = root.get_attribute("data-job-id")
    assert driver.current_url.endswith(f"/ui/jobs/{job_id}")
    wait_finished(driver, root)
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
    keep_screenshot(driver, tmp_path, "dashboard.png")

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


COMPRESS_GOAL = {"max_drop": "50", "max_time_s": "5"}  # a short search on a tiny MLP


def test_compress_to_budget_from_the_form_shows_each_candidate_then_the_winner(
    service, browser, torch_model_bytes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    base = service.stack.api_url
    log_in(driver, base)
    model_path = tmp_path / "mlp.pt"
    model_path.write_bytes(torch_model_bytes)
    driver.get(f"{base}/ui/upload")
    wait(driver, lambda d: d.find_elements(By.ID, "new-preset"), message="upload form")
    goal = driver.find_element(By.ID, "new-goal")
    assert not goal.is_displayed()  # the first preset is not a goal: no goal fields
    Select(driver.find_element(By.ID, "new-preset")).select_by_value("compress-to-budget")
    wait(driver, lambda d: goal.is_displayed(), message="goal fields shown")
    Select(driver.find_element(By.ID, "new-profile")).select_by_value("edge-8mb")

    def fill(name: str, value: str) -> None:
        box = driver.find_element(By.ID, f"new-{name}")
        box.clear()
        box.send_keys(value)

    jobs_before = newest_job(service)
    driver.find_element(By.ID, "file").send_keys(str(model_path))
    fill("max_drop", COMPRESS_GOAL["max_drop"])
    fill("max_time_s", COMPRESS_GOAL["max_time_s"])
    keep_screenshot(driver, tmp_path, "upload_compress.png")
    # A value the browser lets through (max_time_s > 0 is the server's to check) comes back
    # as an inline error under its field, the form as it was left, and nothing started.
    fill("max_time_s", "0")
    driver.find_element(By.ID, "start").click()
    wait(driver, lambda d: d.find_elements(By.ID, "new-max_time_s-error"), message="field error")
    error = driver.find_element(By.ID, "new-max_time_s-error")
    assert error.text.startswith("goal.max_time_s: Input should be greater than 0"), error.text
    assert driver.find_element(By.ID, "new-max_time_s").get_attribute("aria-invalid") == "true"
    preset = Select(driver.find_element(By.ID, "new-preset"))
    assert preset.first_selected_option.get_attribute("value") == "compress-to-budget"
    assert driver.find_element(By.ID, "new-goal").is_displayed()
    assert driver.find_element(By.ID, "new-max_drop").get_attribute("value") == "50"
    assert newest_job(service) == jobs_before

    driver.find_element(By.ID, "file").send_keys(str(model_path))  # file inputs never refill
    fill("max_time_s", COMPRESS_GOAL["max_time_s"])
    Select(driver.find_element(By.ID, "new-objective")).select_by_value("size")
    driver.find_element(By.ID, "start").click()
    root = open_job_page(driver)
    job_id = root.get_attribute("data-job-id")

    # The choice started a goal job: one compress step with the form's goal, on its profile.
    job = service.http.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
    assert job["profile"] == "edge-8mb"
    assert job["steps"] == [
        {
            "name": "compress",
            "params": {
                "max_drop": 50.0,
                "drop_kind": "absolute",
                "objective": "size",
                "max_time_s": 5.0,
            },
        }
    ]

    wait_finished(driver, root)
    assert root.get_attribute("data-transport") == "sse"
    # Live events while the search ran: one line per candidate it reported (the SSE stream
    # samples every 0.5 s, so a burst of quick candidates can share one line).
    lines = driver.execute_script(
        "return Array.from(document.querySelectorAll('#candidates li')).map(l => l.innerText);"
    )
    assert len(lines) >= 2, lines
    assert all(re.search(r"\b\d+/\d+\b", line) for line in lines), lines
    assert driver.find_element(By.ID, "candidates").is_displayed()

    wait(
        driver, lambda d: root.get_attribute("data-results-for") == "COMPLETED:1", message="results"
    )
    card = driver.find_element(By.ID, "compress-result")
    assert card.get_attribute("data-met") == "true", card.text
    done = service.http.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
    record = done["records"][0]
    winner = record["metrics"]["winner"]
    assert driver.find_element(By.ID, "compress-winner").text == winner["label"]
    assert f"{winner['size_ratio']:.1f}x smaller" in card.text
    model_link = driver.find_element(By.ID, "compress-model")
    assert model_link.text == "model.onnx"
    status, size = fetch_in_page(driver, model_link.get_attribute("href"))
    assert (status, size) == (200, record["output_size"])
    widths = loaded_images(driver, "img.plot, #compress-chain")
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    keep_screenshot(driver, tmp_path, "dashboard_compress.png")

    driver.find_element(By.ID, "compress-report").click()
    wait(
        driver,
        lambda d: winner["label"] in d.find_element(By.TAG_NAME, "body").text,
        message="compress report",
    )
    assert driver.current_url.endswith(f"/ui/jobs/{job_id}/steps/0/report")
    assert "Compress to budget" in driver.find_element(By.TAG_NAME, "body").text


def test_the_job_page_falls_back_to_polling_when_its_event_stream_fails(
    service, browser, torch_model_bytes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    base = service.stack.api_url
    # Every request to the event stream fails in the browser, as behind a proxy that drops it.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/jobs/*/events"]})
    log_in(driver, base)
    model_path = tmp_path / "mlp.pt"
    model_path.write_bytes(torch_model_bytes)
    driver.get(f"{base}/ui/upload")
    wait(driver, lambda d: d.find_elements(By.ID, "new-preset"), message="upload form")
    driver.find_element(By.ID, "file").send_keys(str(model_path))
    Select(driver.find_element(By.ID, "new-preset")).select_by_value("measure")
    driver.find_element(By.ID, "start").click()
    root = open_job_page(driver)
    wait_finished(driver, root)
    assert root.get_attribute("data-transport") == "polling"
    assert int(root.get_attribute("data-events")) >= 1
    wait(
        driver, lambda d: root.get_attribute("data-results-for") == "COMPLETED:2", message="results"
    )
    assert driver.find_element(By.ID, "progress").get_attribute("value") == "100"
    states = [
        li.get_attribute("data-state")
        for li in driver.find_elements(By.CSS_SELECTOR, "#timeline li")
    ]
    assert states == ["done", "done"]
