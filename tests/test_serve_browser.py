"""End to end in a real headless browser: `stegoseg serve` on a free local port with a tiny
random-backbone checkpoint; upload a generated image, wait for the maps, click a point, see
the correspondence maps; a bad upload shows a message. Uses Debian's chromium and its
chromedriver (Selenium never downloads a browser here); skipped only when they are missing."""
import shutil
import socket
import time

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no system chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio")
    from stegoseg.data.synthetic import make_synthetic_dataset
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.serve import serve

    root = tmp_path_factory.mktemp("browser")
    data = make_synthetic_dataset(root / "data", n_train=10, n_val=2, size=(48, 64))
    cfg = tiny_config(data, cache_dir=str(root / "cache"))
    fit_feature_baseline(cfg, root / "b").save(root / "checkpoint.pt")
    port = free_port()
    page = serve(root / "checkpoint.pt", port=port, block=False)
    yield f"http://127.0.0.1:{port}/", root
    page.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, css: str, timeout: float = 120, count: int = 1):
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.get_attribute("src") or e.text]
        if len(found) >= count:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{css} did not appear within {timeout} s; page text: {driver.find_element(By.TAG_NAME, 'body').text[:500]}")


def file_input(driver, timeout: float = 60):
    """The upload component's file input (hidden; Selenium can still send it a path)."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        inputs = driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]")
        if inputs:
            return inputs[0]
        time.sleep(0.5)
    raise AssertionError("no file input on the page")


def test_upload_segment_click_and_see_correspondences(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, _ = server
    image = tmp_path / "street.png"
    arr = np.zeros((96, 128, 3), np.uint8)
    arr[:, :64] = (210, 50, 40)
    arr[:, 64:] = (40, 70, 200)
    Image.fromarray(arr).save(image)
    browser.get(url)
    file_input(browser).send_keys(str(image))
    time.sleep(2)  # the upload finishes before the button is pressed
    browser.find_element(By.CSS_SELECTOR, "#segment-button").click()
    cluster = wait_for(browser, "#cluster-map img")[0]
    wait_for(browser, "#overlay img")
    assert "cluster" in browser.find_element(By.CSS_SELECTOR, "#legend").text
    assert "Segmented 1 image" in browser.find_element(By.CSS_SELECTOR, "#message").text
    assert cluster.get_attribute("src")
    shown = wait_for(browser, "#shown-image img")[0]
    ActionChains(browser).move_to_element_with_offset(shown, -10, 5).click().perform()
    panels = wait_for(browser, "#correspondences img", count=3)
    assert len(panels) >= 3
    assert "Correspondences of the point" in browser.find_element(By.CSS_SELECTOR, "#message").text
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_a_bad_upload_shows_a_message_and_the_page_keeps_working(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = server
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    browser.get(url)
    file_input(browser).send_keys(str(bad))
    time.sleep(2)
    browser.find_element(By.CSS_SELECTOR, "#segment-button").click()
    deadline = time.time() + 60
    text = ""
    while "not an image" not in text and time.time() < deadline:
        text = browser.find_element(By.CSS_SELECTOR, "#message").text
        time.sleep(0.5)
    assert "notes.png is not an image" in text


def test_dropping_an_image_segments_it_without_the_button(server, browser, tmp_path):
    """Uploading starts the segmentation (the button is for changed settings), the message says
    what was segmented, and both downloads of every image are offered."""
    from selenium.webdriver.common.by import By

    url, _ = server
    images = []
    for i, colour in enumerate(((200, 60, 40), (40, 160, 90))):
        path = tmp_path / f"dropped{i}.png"
        arr = np.zeros((64, 96, 3), np.uint8)
        arr[:, :48] = colour
        Image.fromarray(arr).save(path)
        images.append(str(path))
    browser.get(url)
    file_input(browser).send_keys("\n".join(images))
    wait_for(browser, "#cluster-map img")
    deadline, text = time.time() + 60, ""
    while "Segmented" not in text and time.time() < deadline:
        text = browser.find_element(By.CSS_SELECTOR, "#message").text
        time.sleep(0.5)
    assert "Segmented 2 image(s) (2 upload(s))" in text
    downloads = browser.find_element(By.CSS_SELECTOR, "#downloads").text.replace("\n.png", ".png")
    for stem in ("dropped0", "dropped1"):
        assert f"{stem}_labels.png" in downloads and f"{stem}_overlay.png" in downloads


def test_gallery_captions_show_whole_file_names(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = server
    path = tmp_path / "a_rather_long_photo_name_from_the_field_0001.png"
    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(path)
    browser.get(url)
    file_input(browser).send_keys(str(path))
    wait_for(browser, "#cluster-map img")
    deadline = time.time() + 30
    while time.time() < deadline and not browser.find_elements(By.CSS_SELECTOR, "#all-images .caption-label"):
        time.sleep(0.5)
    caption = browser.find_element(By.CSS_SELECTOR, "#all-images .caption-label")
    assert browser.execute_script("return getComputedStyle(arguments[0]).whiteSpace", caption) == "normal"
    assert caption.text.replace("\n", "") == path.name
