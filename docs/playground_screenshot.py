"""Writes docs/playground.png: the playground in headless Chromium, on the shipped models, after a refine.

    .venv/bin/python docs/playground_screenshot.py      (needs Debian's chromium and chromium-driver: make tools)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from benchmarks.running import server_process

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle left of a blue square"


def main() -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    with server_process(["--device", "cpu"], ready_timeout_s=300, graceful_stop=True) as (_, url):
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        wait = lambda condition: WebDriverWait(driver, 300, poll_frequency=0.2).until(lambda d: condition(d))  # noqa: E731
        try:
            driver.get(url + "/")
            wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
            driver.find_element(By.ID, "prompt").clear()
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            driver.find_element(By.ID, "refine").click()
            wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .pair")) == 4)
            driver.save_screenshot(str(ROOT / "docs" / "playground.png"))
            print("wrote docs/playground.png")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
