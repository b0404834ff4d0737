"""B12: property-based fuzzing, `long` profile: >= 2,000 Hypothesis examples per target (config files
from the schema, prompt files of every format, CLI options), each run in-process up to the end of
preflight (tests/fuzzing.py). Every example that ends in a traceback, in an exit code other than
0 or 2, in more than one line, or that writes outside its run is counted and its input kept.

    python benchmarks/fuzz_b12.py --examples 2000 --out benchmarks/results/fuzz/b12.json

Prints examples tried, outcomes and tracebacks found per target, and writes them to JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from refusalscope.artifacts import atomic_write_json, writable_arg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fuzzing import TARGETS, make_sandbox  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hseed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tiny_world import write_tiny_world  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from refusalscope.interfaces.cli import app  # noqa: E402


def fuzz(target: str, sandbox, examples: int, seed: int) -> dict:
    codes: Counter = Counter()
    failures: list[dict] = []
    t0 = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=["generate"])
    @given(data=st.data())
    def one(data):
        out, shown = TARGETS[target](sandbox, data)
        codes["traceback" if out.traceback else out.code] += 1
        if sum(codes.values()) % 250 == 0:
            print(f"  {target}: {sum(codes.values())} examples, {codes.get('traceback', 0)} tracebacks", flush=True)
        if out.traceback and len(failures) < 50:
            failures.append({"input": shown[:2000], "traceback": out.traceback[-3000:]})

    hseed(seed)(one)()
    tried = sum(codes.values())
    return {"target": target, "examples": tried, "tracebacks": codes.get("traceback", 0),
            "exit_codes": {str(k): v for k, v in sorted(codes.items(), key=str)},
            "seconds": round(time.perf_counter() - t0, 1), "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per target")
    ap.add_argument("--targets", nargs="*", default=sorted(TARGETS), choices=sorted(TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=writable_arg, default="benchmarks/results/fuzz/b12.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-b12-") as tmp:
        world = write_tiny_world(Path(tmp) / "world")
        ref = Path(tmp) / "reference"
        res = CliRunner().invoke(app, ["run", "-c", str(world / "cfg.yaml"), "-r", str(ref), "-q"])
        assert res.exit_code == 0, res.output
        (Path(tmp) / "sandbox").mkdir()
        sandbox = make_sandbox(Path(tmp) / "sandbox", world, ref)
        results = []
        for target in args.targets:
            r = fuzz(target, sandbox, args.examples, args.seed)
            print(f"{target:8s} {r['examples']:6d} examples  {r['tracebacks']:4d} tracebacks  "
                  f"exit codes {r['exit_codes']}  {r['seconds']} s", flush=True)
            results.append(r)
            write(args, results)  # after each target: a long run interrupted keeps what it found


def write(args, results: list[dict]) -> None:
    out = {"benchmark": "B12 property-based fuzzing (long profile)", "examples_per_target": args.examples,
           "seed": args.seed, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "property": "exit 0 or 2; a failure is one line 'error: ...: <fix>'; no traceback; nothing written "
                       "outside the run", "targets": results,
           "total_examples": sum(r["examples"] for r in results),
           "total_tracebacks": sum(r["tracebacks"] for r in results)}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
