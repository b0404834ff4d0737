"""Issue 22's "done when" on a finished run: tests/test_export_demo.py (every `export --to` format written
by the CLI and read back by its tool) run against RUN, with what pytest said kept as JSON and text.

    .venv/bin/python benchmarks/export_demo.py runs/demo     # the demo run (or REFUSALSCOPE_DEMO_RUN's)
    .venv/bin/python benchmarks/export_demo.py RUN -k tables --out DIR  # one test, results elsewhere

Writes OUT/<run name>.json (per test: outcome, seconds, skip or failure message; counts, wall time, peak
RSS of the largest process) and OUT/<run name>.txt (pytest's output); OUT defaults to
benchmarks/results/export-demo. Exits with pytest's status (2 when RUN is no run directory)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_export_demo.py"


def _cases(junit: Path) -> list[dict]:
    """Per test case of a pytest junit XML file: name, outcome, seconds and message."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or el.text or "").strip()
                break
        out.append({"test": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2),
                    "message": message[:2000]})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", default=os.environ.get("REFUSALSCOPE_DEMO_RUN"),
                    help="a finished run directory (default: $REFUSALSCOPE_DEMO_RUN)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export-demo",
                    help="folder for <run name>.json and .txt")
    ap.add_argument("-k", dest="select", default=None, help="pytest -k expression: run only these tests")
    args = ap.parse_args(argv)
    if args.run is None:
        ap.error("pass a run directory or set REFUSALSCOPE_DEMO_RUN")
    sys.path.insert(0, str(ROOT / "src"))
    from refusalscope.errors import UserError
    from refusalscope.run.results import RunResults

    try:
        run = RunResults(args.run).root.resolve()
    except UserError as err:
        print(f"export_demo: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    env = {**os.environ, "REFUSALSCOPE_DEMO_RUN": str(run), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", "demo", str(TESTS),
               f"--junitxml={junit}", f"--basetemp={Path(tmp) / 'pytest'}"]
        if args.select:
            cmd += ["-k", args.select]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        cases = _cases(junit) if junit.exists() else []
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest process, pytest or a CLI
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    summary = {"run": str(run), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "returncode": proc.returncode,
               "wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024), "counts": counts, "tests": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    name = run.name or "run"
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"{name}.txt").write_text(proc.stdout + proc.stderr)
    print(f"export_demo: {counts['passed']} passed, {counts['failed'] + counts['error']} failed, "
          f"{counts['skipped']} skipped in {wall:.0f} s (peak RSS {summary['peak_rss_mb']} MB): "
          f"{args.out / f'{name}.json'}")
    return summary


if __name__ == "__main__":
    raise SystemExit(main()["returncode"])
