"""The playground in real headless Chromium against a real `softdimo serve`: it asks for the key, generates,
refines while the reward chart fills, compares with the teacher, and shows a refused prompt's message."""

import os
import shutil
from pathlib import Path

import httpx
import pytest
from benchmarks.running import server_process

KEY = "playground-key"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OUTPUT = Path(os.environ.get("SOFTDIMO_TEST_OUTPUT", Path(__file__).parents[2] / "test-output")) / "playground"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (make tools installs them)"
)


@pytest.fixture(scope="module")
def served(tiny_bundles, tmp_path_factory):
    weights = [str(tiny_bundles["one-step"]), str(tiny_bundles["text"])]
    args = ["--weights", *weights, "--device", "cpu", "--max-batch-size", "4", "--refine-max-wait-ms", "10"]
    log = tmp_path_factory.mktemp("playground") / "server.log"
    with server_process(args, log_path=log, env={**os.environ, "SOFTDIMO_API_KEY": KEY}) as (_, url):
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_is_served_offline_and_can_be_turned_off(served, tiny_bundles, tmp_path):
    page = httpx.get(served + "/")  # no key needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    with server_process(["--weights", str(tiny_bundles["one-step"]), "--device", "cpu", "--no-playground"], log_path=tmp_path / "log") as (_, url):
        assert httpx.get(url + "/").status_code == 404


def test_the_playground_generates_refines_compares_and_explains_refusals(served, browser):
    from selenium.webdriver.common.by import By

    find = lambda id_: browser.find_element(By.ID, id_)  # noqa: E731
    browser.get(served + "/")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "error")
    assert "401" in find("error").text and "API key" in find("error").text  # the server asks for the key
    console_errors(browser)  # the refused /v1/models call is logged as a failed load: expected, set aside

    find("key").send_keys(KEY)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert browser.execute_script("return sessionStorage.getItem('softdimo-key')") == KEY
    options = [o.text for o in find("model").find_elements(By.TAG_NAME, "option")]
    assert options == ["tiny-one-step (one-step, text)", "tiny-text (masked-diffusion, text)"]

    find("prompt").clear()
    browser.find_element(By.XPATH, "//span[@class='chip example' and text()='three cyan triangles']").click()
    assert find("prompt").get_attribute("value") == "three cyan triangles"
    find("generate").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 4)
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
    assert captions == ["seed 7", "seed 8", "seed 9", "seed 10"] and "compute" in find("timing").text
    assert browser.execute_script("return getComputedStyle(document.querySelector('#gallery img')).imageRendering") == "pixelated"
    browser.save_screenshot(str(OUTPUT / "generate.png"))

    assert [find(i).get_attribute("value") for i in ("steps", "lr", "best-of")] == ["3", "1", "1"]  # the model's TTEO settings
    find("steps").clear()
    find("steps").send_keys("8")
    find("refine").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .pair")) == 4)
    assert int(find("chart").get_attribute("data-points")) == 4 * 8  # every step of every image reached the chart
    pairs = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
    assert pairs[0].startswith("before: reward") and pairs[1].startswith("after: reward")
    browser.save_screenshot(str(OUTPUT / "refine.png"))

    find("compare").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 8 and "tiny-text" in d.find_element(By.ID, "timing").text)
    browser.save_screenshot(str(OUTPUT / "compare.png"))
    assert console_errors(browser) == []

    find("prompt").clear()
    find("prompt").send_keys("a purple circle")
    find("generate").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    message = find("error").text
    assert message.startswith("422") and "unknown words ['purple']" in message and "colors: red" in message
    browser.save_screenshot(str(OUTPUT / "refused.png"))
    assert all("422" in error for error in console_errors(browser))  # only the refused request's failed load
