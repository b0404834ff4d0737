"""The export downloads clicked in headless Chromium (see test_web_browser.py), on the hostile copy of
the tiny run: the prompt page's download links answer with attachments the browser can fetch."""

from __future__ import annotations

import json

from selenium.webdriver.common.by import By
from test_web_browser import browser, server, shot  # noqa: F401  (its fixtures; skips without Chromium)


def test_downloads_in_a_real_browser(server, browser, tmp_path):  # noqa: F811
    url, run, pid = server
    browser.get(f"{url}/prompts/{pid}")
    links = browser.find_elements(By.CSS_SELECTOR, ".downloads a")
    assert [a.text for a in links[:3]] == ["Neuronpedia list", "SAELens bundle", "Python (rs.apply)"]
    shot(browser, tmp_path, "prompt-downloads")
    for a in links[:3]:
        got = browser.execute_async_script(
            "const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer().then(b => "
            "done([r.status, r.headers.get('content-disposition'), b.byteLength])))", a.get_attribute("href"))
        status, disposition, size = got
        assert status == 200 and disposition.startswith("attachment; filename=") and size > 0
    body = browser.execute_async_script(
        "const done = arguments[1]; fetch(arguments[0]).then(r => r.text()).then(done)", links[0].get_attribute("href"))
    assert json.loads(body)["set"] == f"stage2/{pid}"

