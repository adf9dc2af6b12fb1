"""The playground in real headless Chromium against a real `softdimo serve`: it asks for the key, generates,
refines while the reward chart fills, compares with the teacher, edits under a mask painted with the mouse, and
shows refused requests' messages."""

import base64
import io
import itertools
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from benchmarks.running import server_process
from PIL import Image

from softdimo import editing

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
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
    ):
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


def open_with_key(driver, url):
    """The playground with the key already in the tab's sessionStorage, its models loaded."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    driver.execute_script("sessionStorage.setItem('softdimo-key', arguments[0])", KEY)
    driver.refresh()
    wait_for(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    console_errors(driver)  # the first load, before the key, was refused: set aside


def save_whole_page(driver, path: Path):
    """A screenshot of the whole page, however tall: the window is made as tall as the page for it."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    page_height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(height, page_height + 140))  # the window's frame takes some of its height
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    driver.set_window_size(width, height)


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def gallery_images(driver) -> list[np.ndarray]:
    from selenium.webdriver.common.by import By

    sources = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#gallery img")]
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    return [png_pixels(src.split(",", 1)[1]) for src in sources]


def test_the_page_is_served_offline_and_can_be_turned_off(served, tiny_bundles, tmp_path):
    page = httpx.get(served + "/")  # no key needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    with server_process(
        ["--weights", str(tiny_bundles["one-step"]), "--device", "cpu", "--no-playground"], log_path=tmp_path / "log"
    ) as (_, url):
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
    assert (
        browser.execute_script("return getComputedStyle(document.querySelector('#gallery img')).imageRendering")
        == "pixelated"
    )
    for one, other in itertools.combinations(gallery_images(browser), 2):
        assert (one != other).any(-1).mean() > 0.5  # n = 4 shows four visibly different images: most pixels differ
    browser.save_screenshot(str(OUTPUT / "generate.png"))

    assert [find(i).get_attribute("value") for i in ("steps", "lr", "best-of")] == [
        "3",
        "1",
        "1",
    ]  # the model's TTEO settings
    find("steps").clear()
    find("steps").send_keys("8")
    find("refine").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .pair")) == 4)
    assert int(find("chart").get_attribute("data-points")) == 4 * 8  # every step of every image reached the chart
    pairs = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
    assert pairs[0].startswith("before: reward") and pairs[1].startswith("after: reward")
    browser.save_screenshot(str(OUTPUT / "refine.png"))

    find("compare").click()
    wait_for(
        browser,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 8
            and "tiny-text" in d.find_element(By.ID, "timing").text
        ),
    )
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


def test_the_edit_tab_repaints_where_the_mouse_painted_and_explains_refusals(served, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    find = lambda id_: browser.find_element(By.ID, id_)  # noqa: E731
    open_with_key(browser, served)
    find("generate").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 4)
    generated = gallery_images(browser)[0]

    find("tab-edit").click()
    assert find("edit-panel").is_displayed() and not find("generate-panel").is_displayed()
    find("take-generated").click()
    wait_for(browser, lambda d: "seed 7" in d.find_element(By.ID, "edit-source").text)
    browser.execute_script(  # what the page sends to /edit, kept for the test
        "window.editRequests = []; const send = window.fetch;"
        "window.fetch = (path, init) => {"
        "  if (path === '/edit') editRequests.push(JSON.parse(init.body));"
        "  return send(path, init);"
        "};"
    )

    # A vertical stroke down the right half of the image, from image pixel (40.5, 12.5) to (40.5, 50.5).
    canvas = find("mask")
    half, border, zoom = browser.execute_script(  # the canvas is square
        "const c = arguments[0]; return [c.getBoundingClientRect().width / 2, c.clientLeft, c.clientWidth / 64];",
        canvas,
    )

    def from_centre(x: float, y: float) -> tuple[int, int]:  # image pixels -> whole CSS pixels from the canvas's centre
        return round(border + x * zoom - half), round(border + y * zoom - half)

    def image_point(dx: int, dy: int) -> tuple[float, float]:  # ... and back: where the mouse really went
        return (half + dx - border) / zoom, (half + dy - border) / zoom

    start, end = from_centre(40.5, 12.5), from_centre(40.5, 50.5)
    stroke = ActionChains(browser).move_to_element_with_offset(canvas, *start).click_and_hold()
    stroke.move_by_offset(end[0] - start[0], end[1] - start[1]).release().perform()
    assert int(canvas.get_attribute("data-painted")) > 0
    find("n").clear()
    find("n").send_keys("2")
    find("edit").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 2)
    assert [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")] == ["seed 7", "seed 8"]
    save_whole_page(browser, OUTPUT / "edit.png")

    (sent,) = browser.execute_script("return editRequests")
    assert sent["n"] == 2 and "strength" not in sent and "refine" not in sent
    source = png_pixels(sent["image"])
    assert (source == generated).all()  # the generated image itself
    mask = png_pixels(sent["mask"])
    assert mask.shape == (64, 64, 3) and set(np.unique(mask)) <= {0, 255}
    white = mask[..., 0] == 255
    (x0, y0), (x1, y1) = image_point(*start), image_point(*end)
    radius = float(find("brush").get_attribute("value"))
    rows, columns = np.nonzero(white)
    assert rows.min() >= y0 - radius - 1 and rows.max() <= y1 + radius + 1  # white only around the stroke
    assert columns.min() >= x0 - radius - 1 and columns.max() <= x0 + radius + 1
    assert white[int(y0) : int(y1) + 1, int(x0)].all()  # and all along it

    near = editing.patch_dilation(editing.repaint_from_mask(white[None], grid=8), grid=8).view(8, 8).numpy()
    near = near.repeat(8, 0).repeat(8, 1)  # (64, 64): pixels within one patch of a repainted token
    assert near[:, :24].sum() == 0 and near.all(axis=0)[32:48].all()
    results = gallery_images(browser)
    for result in results:
        assert (result[~near] == source[~near]).all()  # far from the mask: the input's pixels exactly
        assert (result[near] != source[near]).any()  # under it: repainted
    assert (results[0] != results[1]).any()

    find("clear-mask").click()
    assert canvas.get_attribute("data-painted") == "0"
    find("strength").send_keys("0")
    find("edit").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert find("error").text == "422: nothing to edit: strength 0.0 repaints none of the 64 tokens"
    assert "mask" not in browser.execute_script("return editRequests")[-1]  # nothing painted: image-to-image

    small = tmp_path / "small.png"
    Image.fromarray(generated[:32, :32]).save(small)
    find("edit-upload").send_keys(str(small))
    wait_for(browser, lambda d: d.find_element(By.ID, "edit-source").text == "small.png")
    find("strength").clear()
    find("edit").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").text.startswith("422: image"))
    assert find("error").text == "422: image is 32x32; it must be 64x64"
    save_whole_page(browser, OUTPUT / "edit-refused.png")

    find("take-generated").click()
    wait_for(browser, lambda d: "seed 7" in d.find_element(By.ID, "edit-source").text)
    find("edit-refine").click()
    find("edit-steps").clear()
    find("edit-steps").send_keys("2")
    find("n").clear()
    find("n").send_keys("1")
    find("edit").click()
    wait_for(browser, lambda d: "reward" in d.find_element(By.ID, "gallery").text)
    assert not find("error").is_displayed()
    assert browser.execute_script("return editRequests")[-1]["refine"] == {"steps": 2}
    assert find("result-title").text == "Edits, image to image"
    assert all("422" in error for error in console_errors(browser))  # only the refused requests' failed loads
