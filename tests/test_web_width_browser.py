"""The latent browser of a run widened to 5,000 Stage 3 latents, in headless Chromium: the pager
moves through server-side pages (next, last, back), each page holds its own rows, and a latent
opened from a late page shows its dashboard. Screenshot: runs/screens/wide_latents*.png."""

import shutil
import tempfile
from pathlib import Path

import pytest
from bench_scripts import load_benchmark
from test_web_browser import chrome, serving, shot  # skips this module too where Chromium is missing

from refusalscope.interfaces.web.pages import PAGE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wide_server(tiny_run, tmp_path_factory):
    mod = load_benchmark("wide_run")
    run = tmp_path_factory.mktemp("wide-browser") / "run"
    mod.widen_run(tiny_run, run, 5000)
    with serving(run) as url:
        yield url


def test_paging_through_a_wide_run(wide_server, tmp_path):
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="rs-chromium-")
    browser = chrome(profile)
    try:
        def rows():
            return [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#latent-table tbody a.chip")]
        browser.get(wide_server + "/latents?sort=layer")
        total = int(browser.find_element(By.CSS_SELECTOR, "#latent-count strong").text)
        assert total >= 5000
        pages = -(-total // PAGE)
        first = rows()
        assert len(first) == PAGE and f"page 1 of {pages}" in browser.find_element(By.ID, "latent-count").text
        browser.find_element(By.ID, "page-next").click()
        assert "page 2 of" in browser.find_element(By.ID, "latent-count").text
        second = rows()
        assert len(second) == PAGE and not set(first) & set(second)
        browser.find_element(By.ID, "page-last").click()
        last = rows()
        assert f"page {pages} of {pages}" in browser.find_element(By.ID, "latent-count").text
        assert len(last) == total - PAGE * (pages - 1) and not browser.find_elements(By.ID, "page-next")
        shot(browser, tmp_path, "wide_latents_last")
        browser.find_element(By.ID, "page-prev").click()
        assert f"page {pages - 1} of {pages}" in browser.find_element(By.ID, "latent-count").text
        browser.get(wide_server + "/latents?sort=layer")
        shot(browser, tmp_path, "wide_latents")
        fid = last[-1]
        browser.find_element(By.ID, "page-last").click()
        browser.find_element(By.LINK_TEXT, fid).click()
        assert fid in browser.find_element(By.ID, "latent-title").text
        assert browser.find_elements(By.CSS_SELECTOR, "#top-contexts .tok.peak")
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
