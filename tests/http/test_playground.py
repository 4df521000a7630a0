"""The playground page in a real headless Chromium (Debian's chromium + chromedriver,
driven by selenium): load /, paste a key, pick a model, send a message, see the streamed
answer and its usage line (prompt, cached, completion, cost). The screenshot is kept as a
test artefact: under pytest's tmp dir, and copied to $SOL_ARTIFACTS when that is set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM),
                                reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_chat_streams_and_shows_usage(http_server, api_key, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"http://127.0.0.1:{http_server.app.http_port}/")
    assert browser.title == "sol playground"
    key_box = browser.find_element(By.ID, "api-key")
    key_box.send_keys(api_key)
    browser.find_element(By.ID, "max-tokens").click()        # leaving the key field loads the models
    wait.until(lambda d: not d.find_element(By.ID, "model").get_attribute("disabled"))
    models = Select(browser.find_element(By.ID, "model"))
    assert {"tiny", "tiny:sft", "tiny:base", "tiny@1", "tiny@2"} <= {o.get_attribute("value") for o in models.options}
    models.select_by_value("tiny:sft")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")

    browser.find_element(By.ID, "message").send_keys("What is 48 + 27?")
    browser.find_element(By.ID, "send").click()
    usage = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".turn.assistant .usage")))
    answer = browser.find_element(By.CSS_SELECTOR, ".turn.assistant .text").text
    assert answer.strip(), "no streamed text"
    assert "prompt" in usage.text and "cached" in usage.text and "completion" in usage.text and "cost" in usage.text
    assert "version 2" in usage.text

    # A second turn reuses the conversation: its prompt's prefix comes from the cache.
    browser.find_element(By.ID, "message").send_keys("And 10 + 5?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant .usage")) == 2)
    second = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant .usage")[1].text
    assert "(cached 0)" not in second, second
    assert browser.find_element(By.ID, "totals").text.startswith("this conversation")

    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("SOL_ARTIFACTS"):
        out = Path(os.environ["SOL_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "playground.png")
