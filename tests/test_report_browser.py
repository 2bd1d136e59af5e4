"""A real run's report.html in a real headless browser (Selenium + Debian's chromium and chromedriver): it renders
with no console error and its plot is visible, even as a lone file copied away from the run folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium; in the dev extra)")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs chromium and chromedriver on PATH (apt-get install chromium "
                                       "chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _open(driver, page: Path) -> list[dict]:
    """Load `page` and return the browser console entries of level SEVERE."""
    driver.get_log("browser")  # drop what an earlier page left
    driver.get(page.as_uri())
    driver.execute_script("return document.readyState")
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _plot(driver) -> dict:
    return driver.execute_script(
        "const img = document.querySelector('figure img'); if (!img) return null;"
        "const box = img.getBoundingClientRect();"
        "return {complete: img.complete, naturalWidth: img.naturalWidth, width: box.width, height: box.height,"
        "        src: img.src.slice(0, 21)};")


@pytest.fixture(scope="module")
def run_report(tmp_path_factory) -> Path:
    """report.html of a real digits run (10 steps, evaluated every 5, throughput measured)."""
    import copy

    from conftest import DIGITS

    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    raw = copy.deepcopy(DIGITS)
    raw["output_dir"] = str(tmp_path_factory.mktemp("browser") / "runs")
    raw["eval"] = {"every": 5, "compare_before": True, "throughput": True}
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    return recipe.run_dir / "report.html"


def test_report_renders_with_its_plot_and_no_console_error(browser, run_report, tmp_path):
    from selenium.webdriver.common.by import By

    alone = tmp_path / "copied" / "report.html"  # the page alone: a linked image would be missing here
    alone.parent.mkdir()
    shutil.copy(run_report, alone)
    for page in (run_report, alone):
        assert _open(browser, page) == [], page
        plot = _plot(browser)
        assert plot is not None and plot["src"] == "data:image/png;base64"
        assert plot["complete"] and plot["naturalWidth"] > 0, plot
        assert plot["width"] > 0 and plot["height"] > 0, plot
        assert browser.find_element(By.CSS_SELECTOR, "figure img").is_displayed()
        headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
        assert {"Teacher and student", "Speed-up", "Hyper-parameters", "Training and evaluation curves"} <= set(
            headings), headings
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "speed-up: student ÷ teacher samples_per_s" in text and "trainer.lr" in text
        assert "potstill.examples.digits:trained_teacher" in text


def test_a_broken_image_is_caught(browser, tmp_path):
    """The checks above can fail: a page whose plot is a missing file logs a SEVERE error, naturalWidth 0."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><figure><img src="missing.png" alt="x"></figure></body></html>')
    severe = _open(browser, page)
    assert len(severe) == 1 and "missing.png" in severe[0]["message"]
    assert _plot(browser)["naturalWidth"] == 0
