"""B3: wall time of each pipeline stage on this machine (default: the demo preset).

Runs `refusalscope run` into a fresh run directory (or reads an existing one with --read) and
prints the per-stage seconds the run store recorded, plus the total. Writes JSON.

    python benchmarks/bench_pipeline.py [--config demo] [--run runs/bench/pipeline] [--out bench_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from refusalscope.artifacts import writable_arg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--run", default="runs/bench/pipeline")
    ap.add_argument("--read", action="store_true", help="only report an existing run directory")
    ap.add_argument("--out", type=writable_arg, default="bench_pipeline.json")
    args = ap.parse_args()
    run = Path(args.run)
    wall = None
    if not args.read:
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "refusalscope", "run", "-c", args.config, "-r", str(run),
                        "--quiet"], check=True)
        wall = time.perf_counter() - t0
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    rows = [{"stage": k, "seconds": v.get("seconds"), "status": v.get("status")} for k, v in stages.items()]
    total = sum(r["seconds"] or 0 for r in rows)
    result = {"config": args.config, "rows": rows, "stage_total_s": total, "wall_s": wall}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['stage']:<14}{r['seconds'] or 0:>9.1f} s  {r['status']}")
    print(f"{'total':<14}{total:>9.1f} s" + (f"  (wall {wall:.1f} s)" if wall else ""))


if __name__ == "__main__":
    main()
