"""A finished run widened to the paper's scale for the report and the web app: Stage 3 sets are
the heads of per-prompt rankings, so at 65k-wide SAEs their union reaches 10^4-10^5 latents.
`widen_run` copies a real run directory and gives its Stage 3 prompts rankings whose heads hold
`n_latents` distinct latents in all (indices up to `d_sae`), each with a dashboard copied from
the run's own (feature id replaced), plus the offset index the dashboards stage writes. What the
report and the web app read is then as large as a wide run's; the model and SAEs stay the run's.

    python benchmarks/wide_run.py --run runs/demo --out runs/wide-50k --latents 50000
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
from pathlib import Path

import pandas as pd

from refusalscope.artifacts import atomic_write_json, atomic_write_jsonl, atomic_write_table, writable_arg
from refusalscope.run.dashboard_store import index_json
from refusalscope.run.results import RunResults
from refusalscope.run.store import RunStore


def widen_run(src: str | Path, dst: str | Path, n_latents: int, d_sae: int = 65536, seed: int = 0) -> dict:
    """Copy run `src` to `dst` with `n_latents` distinct Stage 3 latents over its prompts; returns
    {n_latents, n_prompts, dashboards_bytes}."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock", "annotations.sqlite*", "report.html"))
    r = RunResults(dst)
    rng = random.Random(seed)
    layers = sorted({f.layer for f in r.critical_features()}) or [0]
    pids = [p.id for p in r.kept_prompts()]
    seen: set[tuple[int, int]] = set()
    while len(seen) < n_latents:
        seen.add((rng.choice(layers), rng.randrange(d_sae)))
    feats = sorted(seen)
    rng.shuffle(feats)
    heads: dict[str, list[str]] = {pid: [] for pid in pids}
    for j, (l, i) in enumerate(feats):  # round robin: every prompt's head is its share of the union
        heads[pids[j % len(pids)]].append(f"{l}-{i}")
    rows = [{"id": pid, "rank": k, "feature": f, "score": round(1.0 - k / (len(fs) + 1), 6)}
            for pid, fs in heads.items() for k, f in enumerate(fs)]
    atomic_write_table(dst / "stage3" / "rankings.parquet", pd.DataFrame(rows))
    old = {rec["id"]: rec for rec in r.jsonl("stage3", "results.jsonl")}
    records = []
    for pid, fs in heads.items():
        k = len(fs)
        rec = old.get(pid, {"id": pid, "tried": [], "completions": {}, "verdicts": {}, "active_stage2": []})
        records.append({**rec, "k": k, "tried": sorted({*rec["tried"], k}),
                        "completions": {**rec["completions"], str(k): "(widened run: synthetic Stage 3 set)"},
                        "verdicts": {**rec["verdicts"], str(k): {"refused": False, "degenerate": False,
                                                                 "jailbroken": True, "judge": "synthetic"}}})
    atomic_write_jsonl(dst / "stage3" / "results.jsonl", records)
    boards = r.jsonl("dashboards", "dashboards.jsonl")
    jsonl = dst / "dashboards" / "dashboards.jsonl"
    known = {b["feature"] for b in boards}
    extra = ({**boards[j % len(boards)], "feature": f"{l}-{i}", "effects": [], "fm_neighbours": []}
             for j, (l, i) in enumerate(sorted(seen)) if f"{l}-{i}" not in known)
    atomic_write_jsonl(jsonl, itertools.chain(boards, extra))
    atomic_write_json(dst / "dashboards" / "dashboards_index.json", index_json(jsonl))
    RunStore(dst, create=False).rerecord(["stage3/rankings.parquet", "stage3/results.jsonl",
                                          "dashboards/dashboards.jsonl", "dashboards/dashboards_index.json"])
    return {"n_latents": n_latents, "n_prompts": len(pids), "dashboards_bytes": jsonl.stat().st_size}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", type=writable_arg, required=True)
    ap.add_argument("--latents", type=int, default=50000)
    ap.add_argument("--d-sae", type=int, default=65536)
    args = ap.parse_args(argv)
    res = widen_run(args.run, args.out, args.latents, args.d_sae)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
