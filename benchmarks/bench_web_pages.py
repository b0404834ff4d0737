"""B10: the web app in a real browser on a run (default runs/demo): page weight and load time of
each kind of page in headless Chromium, the server's time per page (plain HTTP, median of 3), and
playground latency (the first run loads the model; the next ones reuse it). Saves a screenshot
per page. Needs /usr/bin/chromium + chromedriver.

`--widen N` first copies the run and widens it to N Stage 3 latents with dashboards
(benchmarks/wide_run.py: the size a 65k-wide run's report and web app see), then measures the
latent browser's pages across the range, a widened latent's page and the report's size.
`--tiny` builds the planted tiny world's run first (tests/tiny_world.py) and uses it as --run.

    python benchmarks/bench_web_pages.py [--run runs/demo] [--screens runs/screens/demo] [--out bench_web_pages.json]
    python benchmarks/bench_web_pages.py --tiny --widen 50000 --no-playground --out benchmarks/results/web-wide.json
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

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
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


def server_ms(url: str, n: int = 3) -> float:
    """Median wall time of `n` plain GETs of `url`: what the server takes, without the browser."""
    import urllib.request

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=120) as resp:
            resp.read()
        times.append(time.perf_counter() - t0)
    return round(1000 * sorted(times)[n // 2], 1)


def widened(run: Path, n: int, tmp: Path) -> tuple[Path, dict]:
    """A copy of `run` with `n` Stage 3 latents (wide_run.py), its report written and timed."""
    from wide_run import widen_run

    from refusalscope.interfaces.report import write_report

    t0 = time.perf_counter()
    info = widen_run(run, tmp / "wide", n)
    info["widen_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    path = write_report(tmp / "wide")
    info["report_s"], info["report_bytes"] = round(time.perf_counter() - t0, 1), path.stat().st_size
    return tmp / "wide", info


def tiny_run(tmp: Path) -> Path:
    from tiny_world import run_pipeline, write_tiny_world

    world = write_tiny_world(tmp / "world")
    run_pipeline(world, tmp / "tiny-run")
    return tmp / "tiny-run"


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
    ap.add_argument("--widen", type=int, default=0, help="widen the run to this many Stage 3 latents first")
    ap.add_argument("--tiny", action="store_true", help="build the planted tiny world's run and use it")
    ap.add_argument("--no-playground", action="store_true")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="rs-bench-pages-"))
    run, screens = (tiny_run(tmp) if args.tiny else Path(args.run)), Path(args.screens)
    res: dict = {"run": str(run), "pages": {}, "playground": {}}
    if args.widen:
        run, res["widened"] = widened(run, args.widen, tmp)
    screens.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    idx = RunIndex(RunResults(run))
    res["index_build_s"] = round(time.perf_counter() - t0, 2)
    res["n_latents"] = len(idx.latents)
    top = max(idx.latents.values(), key=lambda r: (r.n_prompts, -r.layer))
    woken = [r for r in idx.latents.values() if r.woken]
    pid = next((p for p in idx.prompts if any(p in r.woken for r in woken)), next(iter(idx.prompts)))
    srv, thread, base = start_server(run, tmp / "annotations.sqlite")
    driver = chrome(str(tmp / "profile"))
    pages = {"overview": "/", "latents": "/latents", "latents_stage2": "/latents?stage=2",
             "latent": f"/latents/{top.id}", "prompts": "/prompts", "prompt": f"/prompts/{pid}",
             "study": "/study", "study_results": "/study/results", "playground_page": f"/playground?prompt={pid}"}
    if woken:
        pages["latent_woken"] = f"/latents/{woken[0].id}"
    if args.widen:
        n_pages = -(-len(idx.latents) // 200)
        last = list(idx.latents)[-1]
        pages.update({"latents_page_mid": f"/latents?page={n_pages // 2}",
                      "latents_page_last": f"/latents?page={n_pages}", "latents_by_cos_p3": "/latents?sort=cos&page=3",
                      "latents_stage3_layer": "/latents?stage=3&layer=2", "latents_search": "/latents?q=2-1",
                      "latent_widened": f"/latents/{last}"})
    try:
        t0 = time.perf_counter()
        server_ms(base + "/")  # the first request builds the app's cached indexes
        res["first_request_s"] = round(time.perf_counter() - t0, 2)
        for name, url in pages.items():
            driver.get(base + url)
            driver.get(base + url)
            res["pages"][name] = {"url": url, **timing(driver), "server_ms": server_ms(base + url)}
            shot(driver, screens / f"{name}.png")
        if not args.no_playground:
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
            f"{name:<22} {p['html_bytes'] / 1e3:>8.1f} kB  DOM ready {p['dom_ready_ms']:>7.1f} ms  "
            f"load {p['load_ms']:>7.1f} ms  server {p['server_ms']:>7.1f} ms"
        )
    pg = res["playground"]
    if pg:
        print(f"playground: first {pg['first_with_model_load']['browser_s']} s (model load included), warm "
              + ", ".join(f"{r['browser_s']} s" for r in pg["warm"]))
    if "widened" in res:
        w = res["widened"]
        print(f"widened to {w['n_latents']} latents in {w['widen_s']} s; report {w['report_bytes'] / 1e6:.2f} MB "
              f"in {w['report_s']} s; index {res['index_build_s']} s; first request {res['first_request_s']} s")
    if "report" in res:
        print(f"report.html: {res['report']['bytes'] / 1e6:.2f} MB, load {res['report']['load_ms']} ms")
    return res


if __name__ == "__main__":
    main()
