"""Study: the abliterated model (`export --to model`) beside the direction-ablation hook it stands
for, on a run whose direction stage finished: refusal rate on the held-out harmful prompts (plain,
hook, abliterated) and heretic's first-token KL on harmless prompts (hook, abliterated).

    python benchmarks/study_abliteration.py runs/demo [--model-out runs/demo/exports/model] [--out abl.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from refusalscope.artifacts import atomic_write_json, writable_arg
from refusalscope.export import export
from refusalscope.export.abliterate_eval import measure

ap = argparse.ArgumentParser()
ap.add_argument("run")
ap.add_argument("--model-out", help="folder for the abliterated model (default RUN/exports/model)")
ap.add_argument("--n-harmful", type=int, help="cap on held-out harmful prompts (default all)")
ap.add_argument("--n-harmless", type=int, default=64)
ap.add_argument("--out", type=writable_arg, help="write the numbers to this JSON file too")
args = ap.parse_args()

t0 = time.perf_counter()
written = export(args.run, "model", args.model_out)
t1 = time.perf_counter()
numbers = measure(args.run, written["out"], args.n_harmful, args.n_harmless)
numbers.update(export_seconds=round(t1 - t0, 1), measure_seconds=round(time.perf_counter() - t1, 1),
               exact=written["exact"], untied_embeddings=written["untied_embeddings"],
               check_max_abs_logit_gap=written["check"]["max_abs_logit_gap"])
print(json.dumps(numbers, indent=2))
if args.out:
    atomic_write_json(Path(args.out), numbers)
