"""B9: the web app under load. A real uvicorn server over a run directory, `--clients`
concurrent keep-alive clients making `--requests` GETs over the read pages (overview, latent
browser, latent and prompt pages, study) and `--annotations` annotation posts from distinct
annotators. Reports errors, lost annotations (rows in SQLite vs posts answered 303), p50/p99
latency per kind and throughput. Annotations go to a temporary SQLite file, never the run's.

    python benchmarks/bench_web.py [--run runs/demo] [--clients 8] [--requests 2000] [--annotations 50]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from refusalscope.artifacts import writable_arg


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def start_server(run: Path, store: Path | None = None):
    """A uvicorn server over `run` on a free loopback port, in a daemon thread: (server, thread,
    base URL). `store`: the study's SQLite file (default: the run's own)."""
    import uvicorn

    from refusalscope.interfaces.web import create_app
    from refusalscope.interfaces.web.serve import LOOPBACK_NAMES, bind

    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(create_app(run, allowed_hosts=LOOPBACK_NAMES, annotations=store),
                                        log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started:
            return srv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"
        time.sleep(0.05)
    raise RuntimeError(f"the web app over {run} did not start within 20 s")


def read_urls(run: Path, n_latents: int, seed: int) -> list[str]:
    from refusalscope.interfaces.latent_views import RunIndex
    from refusalscope.run.results import RunResults

    idx = RunIndex(RunResults(run))
    rng = random.Random(seed)
    latents = rng.sample(list(idx.latents), min(n_latents, len(idx.latents)))
    urls = ["/", "/latents", "/latents?stage=2", "/latents?activity=inactive", "/prompts", "/study", "/study/results"]
    urls += [f"/latents/{f}" for f in latents] + [f"/prompts/{p}" for p in idx.prompts]
    return urls


def main(argv: list[str] | None = None) -> dict:
    import httpx

    from refusalscope.run.annotations import AnnotationStore
    from refusalscope.run.results import RunResults

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--annotations", type=int, default=50)
    ap.add_argument("--latents", type=int, default=60, help="distinct latent pages in the mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=writable_arg, default="bench_web.json")
    args = ap.parse_args(argv)
    run = Path(args.run)
    n_items = len(RunResults(run).study_items())
    tmp = Path(tempfile.mkdtemp(prefix="rs-bench-web-"))
    store_path = tmp / "annotations.sqlite"
    srv, thread, base = start_server(run, store_path)
    try:
        urls = read_urls(run, args.latents, args.seed)
        warm = {}
        with httpx.Client(base_url=base, timeout=300) as c:  # first visits build the cached indexes
            for u in urls:
                t0 = time.perf_counter()
                assert c.get(u).status_code == 200, u
                warm[u] = time.perf_counter() - t0
        rng = random.Random(args.seed)
        jobs = [("read", rng.choice(urls)) for _ in range(args.requests)]
        jobs += [("annotate", f"/study/a/bench{k}/{rng.randint(1, n_items)}") for k in range(args.annotations)]
        rng.shuffle(jobs)
        lat: dict[str, list[float]] = {"read": [], "annotate": []}
        errors: list[str] = []
        answered = 0
        lock = threading.Lock()
        local = threading.local()

        def do(job):
            nonlocal answered
            kind, url = job
            if not hasattr(local, "c"):
                local.c = httpx.Client(base_url=base, timeout=300, headers={"Origin": base})
            t0 = time.perf_counter()
            if kind == "read":
                r = local.c.get(url)
                ok = r.status_code == 200
            else:
                r = local.c.post(url, data={"labels": ["None"]}, follow_redirects=False)
                ok = r.status_code == 303
            dt = time.perf_counter() - t0
            with lock:
                lat[kind].append(dt)
                if ok and kind == "annotate":
                    answered += 1
                if not ok:
                    errors.append(f"{r.status_code} {kind} {url}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(do, jobs))
        wall = time.perf_counter() - t0
        rows = AnnotationStore(store_path).count()
    finally:
        srv.should_exit = True
        thread.join(30)
    res = {"run": str(run), "clients": args.clients, "requests": args.requests, "annotation_posts": args.annotations,
           "distinct_urls": len(urls), "errors": len(errors), "error_samples": errors[:5],
           "annotations_answered": answered, "annotation_rows": rows, "lost_annotations": answered - rows,
           "wall_s": round(wall, 2), "requests_per_s": round((args.requests + args.annotations) / wall, 1),
           "first_visit_s": {"max": round(max(warm.values()), 3), "overview": round(warm["/"], 3)},
           "latency_ms": {k: {"p50": round(1000 * _pct(v, 0.5), 1) if v else None,
                              "p99": round(1000 * _pct(v, 0.99), 1) if v else None,
                              "mean": round(1000 * statistics.mean(v), 1) if v else None} for k, v in lat.items()}}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{res['requests']} reads + {res['annotation_posts']} annotation posts, {args.clients} clients, "
          f"{res['wall_s']} s ({res['requests_per_s']} req/s)")
    for k, v in res["latency_ms"].items():
        print(f"  {k:<9} p50 {v['p50']} ms   p99 {v['p99']} ms")
    print(f"  errors {res['errors']}, annotation rows {rows} of {answered} answered (lost {res['lost_annotations']})")
    print(f"  first visit: overview {res['first_visit_s']['overview']} s, slowest page {res['first_visit_s']['max']} s")
    return res


if __name__ == "__main__":
    main()
