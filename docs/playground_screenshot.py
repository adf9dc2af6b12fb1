"""Writes docs/playground.png: the playground in headless Chromium, on the shipped models, after a refine.

    .venv/bin/python docs/playground_screenshot.py      (needs Debian's chromium and chromium-driver: make tools)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle left of a blue square"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--device", "cpu"], cwd=ROOT)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = lambda condition: WebDriverWait(driver, 300, poll_frequency=0.2).until(lambda d: condition(d))  # noqa: E731
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
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
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
