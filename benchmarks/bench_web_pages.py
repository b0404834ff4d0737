"""B10: the web app in a real browser on a run (default runs/demo): page weight and load time of
each kind of page in headless Chromium, and playground latency (the first run loads the model;
the next ones reuse it). Saves a screenshot per page. Needs /usr/bin/chromium + chromedriver.

    python benchmarks/bench_web_pages.py [--run runs/demo] [--screens runs/screens/demo] [--out bench_web_pages.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from refusalscope.artifacts import writable_arg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_web import start_server  # noqa: E402


def chrome(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,1600"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def timing(driver) -> dict:
    t = driver.execute_script("const n = performance.getEntriesByType('navigation')[0];"
                              "return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd, bytes: n.transferSize,"
                              " html: n.decodedBodySize};")
    return {"dom_ready_ms": round(t["dcl"], 1), "load_ms": round(t["load"], 1), "html_bytes": t["html"]}


def shot(driver, path: Path) -> None:
    h = driver.execute_script("return Math.min(document.body.scrollHeight, 7000)")
    driver.set_window_size(1280, max(900, h))
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1600)


def main(argv: list[str] | None = None) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from refusalscope.interfaces.latent_views import RunIndex
    from refusalscope.run.results import RunResults

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--screens", default="runs/screens/demo")
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--out", type=writable_arg, default="bench_web_pages.json")
    args = ap.parse_args(argv)
    run, screens = Path(args.run), Path(args.screens)
    screens.mkdir(parents=True, exist_ok=True)
    idx = RunIndex(RunResults(run))
    top = max(idx.latents.values(), key=lambda r: (r.n_prompts, -r.layer))
    woken = [r for r in idx.latents.values() if r.woken]
    pid = next((p for p in idx.prompts if any(p in r.woken for r in woken)), next(iter(idx.prompts)))
    tmp = Path(tempfile.mkdtemp(prefix="rs-bench-pages-"))
    srv, thread, base = start_server(run, tmp / "annotations.sqlite")
    driver = chrome(str(tmp / "profile"))
    pages = {"overview": "/", "latents": "/latents", "latents_stage2": "/latents?stage=2",
             "latent": f"/latents/{top.id}", "prompts": "/prompts", "prompt": f"/prompts/{pid}",
             "study": "/study", "study_results": "/study/results"}
    if woken:
        pages["latent_woken"] = f"/latents/{woken[0].id}"
    res: dict = {"run": str(run), "pages": {}, "playground": {}}
    try:
        for name, url in pages.items():
            driver.get(base + url)  # first visit builds the app's cached indexes
            driver.get(base + url)
            res["pages"][name] = {"url": url, **timing(driver)}
            shot(driver, screens / f"{name}.png")
        driver.get(f"{base}/study/a/annotator1/1")
        shot(driver, screens / "study_item.png")
        wait = WebDriverWait(driver, 600)
        driver.get(f"{base}/playground?prompt={pid}")
        runs = []
        for i in range(1 + args.warm_runs):
            t0 = time.perf_counter()
            driver.find_element(By.ID, "play-run").click()
            if i == 0:
                time.sleep(0.3)
                shot(driver, screens / "playground_busy.png")
            wait.until(EC.element_to_be_clickable((By.ID, "play-run")))
            wait.until(EC.visibility_of_element_located((By.ID, "play-result")))
            runs.append({"browser_s": round(time.perf_counter() - t0, 2),
                         "server_s": float(driver.find_element(By.ID, "play-seconds").text)})
        shot(driver, screens / "playground.png")
        res["playground"] = {"prompt": pid, "first_with_model_load": runs[0], "warm": runs[1:]}
        report = run / "report.html"
        if report.exists():
            driver.get(report.resolve().as_uri())
            res["report"] = {"bytes": report.stat().st_size, **timing(driver)}
            shot(driver, screens / "report.png")
    finally:
        driver.quit()
        srv.should_exit = True
        thread.join(30)
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    for name, p in res["pages"].items():
        print(
            f"{name:<15} {p['html_bytes'] / 1e3:>8.1f} kB  DOM ready {p['dom_ready_ms']:>7.1f} ms  "
            f"load {p['load_ms']:>7.1f} ms"
        )
    pg = res["playground"]
    print(f"playground: first {pg['first_with_model_load']['browser_s']} s (model load included), warm "
          + ", ".join(f"{r['browser_s']} s" for r in pg["warm"]))
    if "report" in res:
        print(f"report.html: {res['report']['bytes'] / 1e6:.2f} MB, load {res['report']['load_ms']} ms")
    return res


if __name__ == "__main__":
    main()
