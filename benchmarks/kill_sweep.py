"""B8: kill the whole pipeline at many random points, resume with the same command, compare.

On the planted tiny world (tests/tiny_world.py), an uninterrupted `refusalscope run` is the
reference. Each trial runs the same command and SIGKILLs it one to three times, each time at a
random point picked by one of three rules: a random time (uniform over the reference's wall time,
the process group killed), the N-th atomic write (killed inside it: the temp file half written,
never renamed), or the N-th checkpoint append (killed inside the line). Then it runs the command
once more to the end and compares every artifact with the reference (run/compare.py: bytes for
every artifact, values for the manifest minus timings, final records for checkpoints).

    python benchmarks/kill_sweep.py --trials 40 --out runs/bench/kill_sweep.json

With `--config` (a config file or preset, e.g. `demo`) the sweep runs that pipeline instead of the
tiny world's. With `--chain N` it runs one trial that is killed N times in a row (each restart
killed again at a new random point, so the kills spread over the whole pipeline), for pipelines
too long to rerun N times (the demo: benchmarks/results/kill-sweep/demo-10.json); each kill
counts as identical when the final run equals the reference in the stage the kill landed in.

Prints a table per stage and per rule and writes every trial to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from refusalscope.artifacts import writable_arg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from faults import run_cli  # noqa: E402

from refusalscope.run.compare import compare_runs  # noqa: E402

RULES = ("time", "write", "append")


def timed_kill(cmd: list[str], delay: float) -> tuple[bool, float]:
    """Run `cmd` and SIGKILL its process group after `delay` s; (killed, seconds). A run that ends
    by itself before then must have ended well."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "faults.py"), "count:/dev/null", "--", *cmd],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, time.perf_counter() - t0
        if rc != 0:
            err.seek(0)
            raise RuntimeError(f"the run ended with {rc} before its kill at {delay} s: {err.read()[-800:]}")
        return False, time.perf_counter() - t0


def where(run: Path) -> str:
    """The stage a kill landed in: the one the manifest says is running, else between stages."""
    try:
        stages = json.loads((run / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return "startup"
    running = [s for s, e in stages.items() if e.get("status") != "done"]
    return running[0] if running else (f"after {list(stages)[-1]}" if stages else "startup")


def kill_once(rule: str, point: float, cmd: list[str], run: Path) -> dict:
    """One kill of `cmd` by `rule` at `point` (seconds, or the N-th write/append of this process)."""
    if rule == "time":
        fired, _ = timed_kill(cmd, point)
    else:
        proc = run_cli(f"kill@{rule}:{int(point)}", *cmd, timeout=None)
        fired = proc.returncode == -signal.SIGKILL
        if not fired and proc.returncode != 0:
            raise RuntimeError(f"{rule} {point} ended with {proc.returncode}: {proc.stderr[-500:]}")
    orphans = sorted(p.name for p in run.rglob(".*.tmp*")) if run.exists() else []
    return {"rule": rule, "point": point, "fired": fired, "stage": where(run) if fired else None,
            "temp_files_left": orphans}


def diff_stages(diff: str) -> set[str]:
    """The stages a compare_runs line is about: its folder, the stages a manifest line names, or
    "run" for the others (a failed resume, a manifest line naming none)."""
    head = diff.split(":")[0]
    if "/" in head:
        return {head.split("/")[0]}
    named = re.search(r"stages \[([^\]]*)\]", diff) if head == "manifest.json" else None
    stages = set(re.findall(r"'([^']+)'", named.group(1))) if named else set()
    return stages or {"run"}


def chain(rng: random.Random, cmd_of, ref: Path, counts: dict, t_ref: float, work: Path, n: int,
          rules=RULES, startup: float = 30.0) -> dict:
    """One run killed `n` times in a row, each restart at a fresh random point, then finished and
    compared. A restart redoes only unfinished work, so a window of 1.5 x (reference / n) after
    start-up moves each kill on by about 3/4 of an n-th of the pipeline: the kills cover it."""
    run = work / "chain"
    shutil.rmtree(run, ignore_errors=True)
    cmd, kills, t0 = cmd_of(run), [], time.perf_counter()
    for j in range(n):
        rule = rng.choice(rules)
        point = (round(rng.uniform(startup, startup + 1.5 * t_ref / n), 2) if rule == "time"
                 else rng.randint(1, max(1, int(1.5 * counts[rule] / n))))
        kills.append(kill_once(rule, point, cmd, run))
        k = kills[-1]
        print(f"kill {j + 1:2d}/{n}: {rule}@{point} -> {k['stage'] or 'missed (the run finished)'}", flush=True)
        if not k["fired"]:
            break
    final = run_cli("count:/dev/null", *cmd, timeout=None)
    diffs = compare_runs(ref, run) if final.returncode == 0 else [f"run: resume failed: {final.stderr[-300:]}"]
    bad = set().union(*(diff_stages(d) for d in diffs))
    for k in kills:
        k["identical"] = k["fired"] and not ("run" in bad or k["stage"] in bad)
    return {"trial": 0, "kills": kills, "resume_rc": final.returncode, "identical": not diffs, "diffs": diffs,
            "seconds": round(time.perf_counter() - t0, 1)}


def trial(i: int, rng: random.Random, cmd_of, ref: Path, counts: dict, t_ref: float, work: Path,
          rules=RULES) -> dict:
    run = work / f"trial-{i:03d}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = cmd_of(run)
    kills = []
    t0 = time.perf_counter()
    for _ in range(rng.choice((1, 1, 2, 3))):
        rule = rng.choice(rules)
        point = round(rng.uniform(0.5, t_ref), 2) if rule == "time" else rng.randint(1, counts[rule])
        kills.append(kill_once(rule, point, cmd, run))
    final = run_cli("count:/dev/null", *cmd, timeout=None)
    diffs = compare_runs(ref, run) if final.returncode == 0 else [f"resume failed: {final.stderr[-300:]}"]
    out = {"trial": i, "kills": kills, "resume_rc": final.returncode, "identical": not diffs, "diffs": diffs,
           "seconds": round(time.perf_counter() - t0, 1)}
    shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench/kill-sweep", help="folder for the world and the trial runs")
    ap.add_argument("--out", type=writable_arg, default="runs/bench/kill_sweep.json")
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="how kill points are picked")
    ap.add_argument("--seconds", type=float, default=None,
                    help="window for timed kills (default: the reference's wall time, long on a loaded machine)")
    ap.add_argument("--config", default=None,
                    help="config file or preset to run (default: the planted tiny world's)")
    ap.add_argument("--chain", type=int, default=None,
                    help="one trial killed this many times in a row (instead of --trials)")
    ap.add_argument("--keep-reference", action="store_true",
                    help="reuse the reference run (and counts.json) a previous sweep left in --work")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    config = args.config
    if config is None:
        world = work / "world"
        if not (world / "cfg.yaml").exists():
            from tiny_world import write_tiny_world

            write_tiny_world(world)
        config = str(world / "cfg.yaml")
    ref = work / "reference"
    cmd_of = lambda run: ["run", "-c", config, "-r", str(run), "-q"]  # noqa: E731
    timing = work / "reference.json"
    if args.keep_reference and timing.exists() and (work / "counts.json").exists():
        t_ref = json.loads(timing.read_text())["seconds"]
    else:
        shutil.rmtree(ref, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = run_cli(f"count:{work / 'counts.json'}", *cmd_of(ref), timeout=None)
        t_ref = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        timing.write_text(json.dumps({"seconds": round(t_ref, 1)}))
    counts = json.loads((work / "counts.json").read_text())
    print(f"reference: {t_ref:.1f} s, {counts['write']} atomic writes, {counts['append']} checkpoint appends",
          flush=True)
    window = args.seconds or t_ref
    rng = random.Random(args.seed)
    trials = []
    if args.chain:
        trials.append(chain(rng, cmd_of, ref, counts, window, work, args.chain, args.rules))
        write(args.out, t_ref, counts, args.rules, window, trials, config)
        print_summary(summarise(trials))
        return 0 if trials[0]["identical"] else 1
    for i in range(args.trials):
        trials.append(trial(i, rng, cmd_of, ref, counts, window, work, args.rules))
        t = trials[-1]
        kills = ", ".join(f"{k['rule']}@{k['point']}->{k['stage'] or 'missed'}" for k in t["kills"])
        print(f"trial {i:3d}: {kills}  identical={t['identical']}  {t['seconds']} s", flush=True)
        write(args.out, t_ref, counts, args.rules, window, trials, config)
    print_summary(summarise(trials))
    return 0 if all(t["identical"] for t in trials) else 1


def write(out, t_ref: float, counts: dict, rules: list[str], window: float, trials: list[dict], config: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"config": config, "reference": {"seconds": round(t_ref, 1), **counts},
                                     "rules": rules, "time_window_s": round(window, 1),
                                     "summary": summarise(trials), "trials": trials}, indent=2))


def summarise(trials: list[dict]) -> dict:
    fired = [k for t in trials for k in t["kills"] if k["fired"]]
    return {"trials": len(trials), "identical_trials": sum(t["identical"] for t in trials),
            "identical_kills": sum(bool(k.get("identical", t["identical"])) for t in trials for k in t["kills"]
                                   if k["fired"]),
            "kill_points_tried": sum(len(t["kills"]) for t in trials), "kills_that_fired": len(fired),
            "kills_leaving_a_temp_file": sum(bool(k["temp_files_left"]) for k in fired),
            "by_stage": dict(Counter(k["stage"] for k in fired)), "by_rule": dict(Counter(k["rule"] for k in fired))}


def print_summary(s: dict) -> None:
    print(
        f"\n{s['trials']} trials, {s['kills_that_fired']} kills landed ({s['kill_points_tried']} tried, "
        f"{s['kills_leaving_a_temp_file']} left a half-written temp file); "
        f"identical after resume: {s['identical_trials']} of "
        f"{s['trials']}; kills followed by an identical stage: {s['identical_kills']} of {s['kills_that_fired']}"
    )
    print("kills by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_stage"].items())))
    print("kills by rule:  " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_rule"].items())))


if __name__ == "__main__":
    sys.exit(main())
