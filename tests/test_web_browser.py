"""The web app in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by .ci/run) driven by Selenium against `refusalscope serve`'s server on a real tiny run
whose prompt and replies carry HTML/JS. Opens the overview, filters latents, opens a latent
page, runs the playground once, submits answers from two annotators and finds them on the
results page. Screenshots go to the test's tmp dir and to runs/screens/ (or $REFUSALSCOPE_SCREENS)."""

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from bench_scripts import load_benchmark
from tiny_world import hostile_copy

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not CHROMIUM.exists() or not DRIVER.exists():
    print("\n" + "!" * 78 + "\nSKIPPING THE BROWSER TESTS: /usr/bin/chromium or /usr/bin/chromedriver is missing "
          "(apt-get install chromium chromium-driver; .ci/run installs them)\n" + "!" * 78)
    pytest.skip("Chromium is not installed (/usr/bin/chromium): the browser tests need it", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

SCREENS = Path(os.environ.get("REFUSALSCOPE_SCREENS", Path(__file__).resolve().parents[1] / "runs" / "screens"))


def chrome(profile: str, size=(1280, 1600)) -> webdriver.Chrome:
    """Headless Chromium that makes no background connections (the machine has no network)."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-default-apps", "--disable-extensions", f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(arg)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a driver
    return webdriver.Chrome(service=Service(str(DRIVER)), options=opts)


@contextmanager
def serving(run: Path, store: Path | None = None):
    """The web app over `run` on a free loopback port for a `with` block; yields its base URL."""
    srv, thread, url = load_benchmark("bench_web").start_server(run, store)
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    run, pid = hostile_copy(tiny_run, tmp_path_factory.mktemp("browser") / "run")
    with serving(run) as url:
        yield url, run, pid


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="rs-chromium-")
    driver = chrome(profile)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def shot(driver, tmp_path, name: str) -> Path:
    """Save a full-page screenshot (tmp dir + the stable screens folder)."""
    height = driver.execute_script("return Math.min(document.body.scrollHeight, 6000)")
    driver.set_window_size(1280, max(900, height))
    out = tmp_path / f"{name}.png"
    driver.save_screenshot(str(out))
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, SCREENS / f"{name}.png")
    driver.set_window_size(1280, 1600)
    return out


def no_xss(driver) -> None:
    assert driver.execute_script("return typeof window.__xss") == "undefined"


def test_the_app_in_a_real_browser(server, browser, tmp_path):
    url, run, pid = server
    wait = WebDriverWait(browser, 120)
    t0 = time.perf_counter()
    browser.get(url + "/")
    load = time.perf_counter() - t0
    assert "Refusal direction" in browser.find_element(By.ID, "direction").text
    assert browser.find_element(By.ID, "stage2").find_elements(By.TAG_NAME, "img")
    no_xss(browser)
    shot(browser, tmp_path, "overview")

    browser.get(url + "/latents")
    total = int(browser.find_element(By.CSS_SELECTOR, "#latent-count strong").text)
    Select(browser.find_element(By.NAME, "stage")).select_by_value("2")  # auto-submits
    wait.until(EC.url_contains("stage=2"))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#latent-count strong")))
    filtered = int(browser.find_element(By.CSS_SELECTOR, "#latent-count strong").text)
    assert 0 < filtered < total
    browser.find_element(By.CSS_SELECTOR, "#latent-table th:nth-child(3)").click()  # sort by prompts
    shot(browser, tmp_path, "latents")
    first = browser.find_element(By.CSS_SELECTOR, "#latent-table tbody a.chip")
    fid = first.text
    first.click()
    wait.until(EC.presence_of_element_located((By.ID, "latent-title")))
    assert fid in browser.find_element(By.ID, "latent-title").text
    assert browser.find_elements(By.CSS_SELECTOR, "#top-contexts .tok.peak")
    assert browser.find_elements(By.CSS_SELECTOR, "img[alt='histogram of non-zero activations']")
    shot(browser, tmp_path, "latent")

    browser.get(f"{url}/prompts/{pid}")
    assert "<script>window.__xss=1</script>" in browser.find_element(By.ID, "prompt-text").text
    no_xss(browser)
    shot(browser, tmp_path, "prompt")

    browser.get(f"{url}/playground?prompt={pid}")
    # its Stage 2 set, fetched from /api/playground/preset/{pid} and filled in
    wait.until(lambda d: d.find_element(By.ID, "play-latents").get_attribute("value"))
    browser.find_element(By.ID, "play-run").click()
    wait.until(EC.visibility_of_element_located((By.ID, "play-result")))
    assert browser.find_element(By.ID, "play-run").is_enabled()
    assert 0 <= float(browser.find_element(By.ID, "p-plain").text) <= 1
    assert "ablated" in browser.find_element(By.ID, "play-what").text
    no_xss(browser)
    shot(browser, tmp_path, "playground")

    for name, label in (("alice", "dangerous_topics"), ("bob", "None")):
        browser.get(url + "/study")
        browser.find_element(By.ID, "annotator-name").send_keys(name)
        browser.find_element(By.CSS_SELECTOR, "#study-start button").click()
        wait.until(EC.url_contains(f"/study/a/{name}/1"))
        if name == "alice":
            shot(browser, tmp_path, "study_item")
        browser.find_element(By.CSS_SELECTOR, f"input[name=labels][value={label}]").click()
        browser.find_element(By.ID, "item-submit").click()
        wait.until(EC.url_contains(f"/study/a/{name}/2"))
    browser.get(url + "/study/results")
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "alice" in page and "bob" in page
    stored = browser.find_element(By.ID, "study-summary").find_element(By.CSS_SELECTOR, "tr td").text
    assert int(stored) >= 2
    shot(browser, tmp_path, "study_results")
    print(f"\noverview load {load:.2f} s; screenshots in {tmp_path} and {SCREENS}")
