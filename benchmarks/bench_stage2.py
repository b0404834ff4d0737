"""B2: Stage 2 (Algorithm 1) for one prompt, literal sequential form vs the batched form.

All τ ∈ {0.1..0.8} and seeds {0,1,2}, N = 5, on one refused prompt with a Stage 1-sized pool
(the top-K latents per layer aligned with the demo world's refusal direction, or with a mean
difference computed here when no run exists). Checks the sets are identical and reports forward
passes (sequential) and wall time.

    python benchmarks/bench_stage2.py [--k 10] [--out bench_stage2.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from refusalscope.interventions.spec import FeatureAblation
from refusalscope.io.prompts import load_bundled
from refusalscope.methods.direction import mean_differences
from refusalscope.methods.evaluate import refusal_probs
from refusalscope.methods.stage1 import aligned_latents, top_k_set
from refusalscope.methods.stage2 import batched_traces, literal_algorithm1

TAUS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
SEEDS = [0, 1, 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=10, help="latents per layer in the pool")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--out", default="bench_stage2.json")
    args = ap.parse_args()
    from bench_ablation import load_world

    model, saes, world = load_world(2048)
    harm = [p.text for p in load_bundled("harmful", split="train")][:32]
    safe = [p.text for p in load_bundled("harmless", split="train")][:32]
    layer = model.n_layers // 2
    r = mean_differences(model, harm, safe, [-1], 16)[0, layer]
    ranked, _ = aligned_latents(saes, r, [l for l in saes.keys() if l >= 2], args.k)
    pool = [(l, i) for l, ids in top_k_set(ranked, args.k).items() for i in ids]
    prompt = load_bundled("harmful", split="test")[0].text

    t0 = time.perf_counter()
    traces = batched_traces(model, saes, prompt, pool, 5, SEEDS, args.batch)
    batched_s = time.perf_counter() - t0
    rows = sum(len(t.probs) for t in traces)

    calls = []

    def p_fn(ablated):
        calls.append(1)
        plans = [[FeatureAblation.from_ids(ablated)]] if ablated else None
        return refusal_probs(model, saes, [prompt], plans=plans).item()

    t0 = time.perf_counter()
    same = all(literal_algorithm1(p_fn, pool, 5, tau, t.seed) == t.selected(tau) for tau in TAUS for t in traces)
    literal_s = time.perf_counter() - t0
    result = {"world": world, "pool": len(pool), "literal_passes": len(calls), "literal_s": literal_s,
              "batched_rows": rows, "batched_passes": -(-rows // args.batch), "batched_s": batched_s,
              "pass_ratio": len(calls) / -(-rows // args.batch), "time_ratio": literal_s / batched_s,
              "identical_sets": same, "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for k, v in result.items():
        print(f"{k:>16}: {v:.3f}" if isinstance(v, float) else f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
