"""The dashboard in a real browser: Debian's headless Chromium (Selenium, chromedriver) against a real job.

A real coordinator process with a dashboard token and three client
processes run a short job. The browser signs in through the form, then
watches without reloading: the page must update itself round after round,
end on the final metric the coordinator wrote, list the clients, and log no
console error (a CSP violation, a failed asset or a script error would). The
report.html written afterwards must open from disk with no error either.

Long (FEDSITE_LONG_TESTS=1): it needs `apt-get install chromium chromium-driver`
and `pip install selenium`. The screenshots land in the test's tmp_path, or in
FEDSITE_SCREENSHOT_DIR when set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.live_job import DASHBOARD_TOKEN, live_job

pytestmark = [pytest.mark.long, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="fedsite-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--no-first-run", "--window-size=1360,1400", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _screenshot(driver: Any, path: Path) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1360, int(height) + 40)
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    if os.environ.get("FEDSITE_SCREENSHOT_DIR"):
        Path(os.environ["FEDSITE_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["FEDSITE_SCREENSHOT_DIR"]) / path.name)
    return path


def _state(driver: Any) -> dict[str, str]:
    return driver.execute_script(
        "var w = document.querySelector('#dashboard .wrap'); var t = document.getElementById('status-text');"
        "return w ? {status: w.dataset.status, done: w.dataset.completedRounds, text: t ? t.textContent : '',"
        " marker: String(window.__fedsiteMarker)} : {};")


def test_the_page_follows_a_real_job_in_chromium(tmp_path: Path, tiny_bert_dir: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    with live_job(tmp_path, tiny_bert_dir, clients=3, rounds=3, steps=20) as job:
        browser.get(job.url)
        browser.find_element(By.NAME, "token").send_keys(DASHBOARD_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "form button").click()
        deadline = time.monotonic() + 60
        while not _state(browser).get("status"):
            assert time.monotonic() < deadline, browser.page_source[:2000]
            time.sleep(0.2)
        browser.execute_script("window.__fedsiteMarker = 'same page';")  # gone if the page ever reloads
        job.start_clients()

        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + 900
        while True:
            state = _state(browser)
            if state and (not seen or (state["done"], state["text"]) != (seen[-1]["done"], seen[-1]["text"])):
                seen.append(state)
            if state.get("status") == "done":
                break
            assert time.monotonic() < deadline, f"{seen[-5:]}\n{job.logs()}"
            assert job.coordinator.poll() is None, job.logs()
            time.sleep(0.25)
        shot = _screenshot(browser, tmp_path / "dashboard-live.png")
        records = job.records()
        metric = browser.find_element(By.CSS_SELECTOR, "#kpi-metric .v").text
        table = browser.find_element(By.ID, "clients").text
        status_text = browser.find_element(By.ID, "status-text").text
        errors = _errors(browser)

    assert state["marker"] == "same page", "the page reloaded instead of updating itself"
    done_values = [int(s["done"]) for s in seen]
    assert done_values == sorted(done_values) and len(set(done_values)) >= 2, seen  # it advanced, live
    assert any(s["text"].startswith("round ") for s in seen), seen
    assert status_text.startswith("done: 3 rounds (3 ok)")
    assert metric == f"{records[-1]['val_accuracy']:.4f}"
    for cid in records[-1]["sampled_client_ids"]:
        assert cid in table
    assert all(f"party-{i}" in table for i in range(3))
    assert not errors, errors
    print(f"screenshot: {shot}; states seen: {[(s['done'], s['text']) for s in seen]}")

    # the report's page, from disk, in the same browser
    from simulations.report import write_report

    write_report([job.output], tmp_path / "report")
    browser.get((tmp_path / "report" / "report.html").as_uri())
    assert browser.find_element(By.ID, "status-text").text.startswith("done: 3 rounds")
    assert browser.find_element(By.CSS_SELECTOR, "#kpi-metric .v").text == metric
    assert not _errors(browser)
    _screenshot(browser, tmp_path / "report-html.png")
