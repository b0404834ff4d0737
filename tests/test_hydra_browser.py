"""The paper's hydra finding as a person meets it, in headless Chromium, on the planted world with
redundant refusal (tests/planted_hydra.py): the web app's hydra section names the rule that
picked the prompts and lists the woken latent per prompt, the latent browser filters it as
woken, its page says where it woke up, a prompt page boxes the tokens where it fired, and the
offline report carries the same section. Screenshots: runs/screens/hydra_*.png."""

import tempfile

import pytest
from planted_hydra import HYDRA_ID
from test_web_browser import chrome, serving, shot  # skips this module too where Chromium is missing


@pytest.fixture(scope="module")
def hydra_server(hydra_run, tmp_path_factory):
    # the study's SQLite file goes to a tmp dir: the shared run stays read-only
    with serving(hydra_run, tmp_path_factory.mktemp("hydra-web") / "annotations.sqlite") as url:
        yield url


def test_the_woken_latent_in_the_web_app_and_the_report(hydra_server, hydra_run, tmp_path):
    from selenium.webdriver.common.by import By

    from refusalscope.interfaces.report import write_report

    browser = chrome(tempfile.mkdtemp(prefix="rs-chromium-"))
    try:
        browser.get(hydra_server + "/")
        hydra = browser.find_element(By.ID, "hydra")
        assert "jailbreak lost without the inactive latents" in hydra.text
        table = ".//h4[.='Woken latents per prompt']/following-sibling::table[1]/tbody/tr"
        woken_rows = hydra.find_elements(By.XPATH, table)
        assert woken_rows and all(HYDRA_ID in r.text for r in woken_rows)
        hydra.screenshot(str(tmp_path / "hydra_section.png"))
        shot(browser, tmp_path, "hydra_overview")

        browser.get(hydra_server + "/latents?activity=woken")
        listed = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#latent-table tbody a.chip")]
        assert listed == [HYDRA_ID]

        browser.get(f"{hydra_server}/latents/{HYDRA_ID}")
        rows = browser.find_elements(By.CSS_SELECTOR, "#critical-prompts tbody tr")
        assert len(rows) == len(woken_rows)
        assert all("inactive" in r.text and "post_instruction" in r.text for r in rows)
        shot(browser, tmp_path, "hydra_latent")

        prompt = rows[0].find_element(By.TAG_NAME, "a").text
        browser.get(f"{hydra_server}/prompts/{prompt}")
        boxed = browser.find_elements(By.CSS_SELECTOR, "#prompt-tokens .tok.woken")
        assert boxed and all(HYDRA_ID in t.get_attribute("title") for t in boxed)
        assert "Woken hydra latents" in browser.page_source
        shot(browser, tmp_path, "hydra_prompt")

        report = write_report(hydra_run, tmp_path / "report.html")
        browser.get(report.resolve().as_uri())
        section = browser.find_element(By.ID, "hydra")
        assert "jailbreak lost without the inactive latents" in section.text and HYDRA_ID in section.text
        section.screenshot(str(tmp_path / "hydra_report.png"))
    finally:
        browser.quit()
