"""Screenshots of the web app for the docs (docs/img/web-*.png), taken from a real run.

    .venv/bin/python docs/_tools/screenshots.py [--run RUN_DIR] [--out docs/img]

Without --run it writes the planted tiny world of the tests (tests/tiny_world.py) and runs the
whole pipeline on it first (a few minutes on a CPU). Then it starts `refusalscope serve` on a
copy of the run, lets three annotators answer the study through the app's own form (seeded
choices, so the results page has something to show), takes each page with Debian's headless
Chromium and stores it as a palette PNG (small enough to commit).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"


def tiny_run(workdir: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_world import write_tiny_world

    world = write_tiny_world(workdir / "world")
    run = workdir / "run"
    subprocess.run([str(BIN / "refusalscope"), "run", "-c", str(world / "cfg.yaml"), "-r", str(run), "-q"],
                   check=True)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 (loopback only)
        return r.read().decode()


def annotate(base: str, annotators=("ann", "bea", "cem")) -> int:
    """Every annotator answers every study item through the form: one or two of the offered
    categories, or "None", drawn from a seeded RNG. Returns the number of answers posted."""
    posted = 0
    for name in annotators:
        rng = random.Random(name)
        n = 1
        while True:
            try:
                page = get(f"{base}/study/a/{name}/{n}")
            except OSError:  # past the last item: 404
                break
            offered = re.findall(r'name="labels" value="([^"]+)"', page)
            choices = [c for c in offered if c != "None"]
            labels = ["None"] if not choices or rng.random() < 0.2 else rng.sample(choices, min(len(choices),
                                                                                     rng.choice((1, 2))))
            body = urllib.parse.urlencode([("labels", label) for label in labels]).encode()
            req = urllib.request.Request(f"{base}/study/a/{name}/{n}", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=30):  # noqa: S310 (loopback only)
                posted += 1
            n += 1
    return posted


def shoot(url: str, out: Path, size: tuple[int, int], profile: Path) -> None:
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(out) as img:  # a 256-colour palette: a fifth of the bytes, same look for flat UI
        img.convert("RGB").quantize(colors=256).save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished run directory (default: a fresh tiny-world run)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.run or tiny_run(Path(tmp))
        run = Path(tmp) / "served"  # the study writes annotations.sqlite into the run: serve a copy
        shutil.copytree(source, run)
        port = free_port()
        server = subprocess.Popen([str(BIN / "refusalscope"), "serve", str(run), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    get(base + "/")
                    break
                except OSError:
                    time.sleep(0.2)
            print(f"annotations posted: {annotate(base)}")
            latent = re.search(r'href="/latents/(\d+-\d+)"', get(base + "/latents"))
            prompt = re.search(r'href="/prompts/([^"/?]+)"', get(base + "/prompts"))
            pages = {"overview": ("/", (1280, 1400)), "latents": ("/latents", (1280, 900)),
                     "study-results": ("/study/results", (1280, 800)),
                     "playground": ("/playground", (1280, 800)), "study-item": ("/study/a/ann/1", (1280, 1000))}
            if latent:
                pages["latent"] = (f"/latents/{latent.group(1)}", (1280, 1600))
            if prompt:
                pages["prompt"] = (f"/prompts/{prompt.group(1)}", (1280, 1100))
            for name, (path, size) in pages.items():
                out = args.out / f"web-{name}.png"
                shoot(base + path, out, size, Path(tmp) / "chromium")
                print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: {path} "
                      f"({out.stat().st_size // 1024} KiB)")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
