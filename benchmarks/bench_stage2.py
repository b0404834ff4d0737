"""B2: Stage 2 (Algorithm 1) for one prompt, literal sequential form vs the batched form.

All τ ∈ {0.1..0.8} and seeds {0,1,2}, N = 5, on one refused prompt with a Stage 1-sized pool
(the top-K latents per layer aligned with the demo world's refusal direction, or with a mean
difference computed here when no run exists). Checks the sets are identical and reports forward
passes (sequential) and wall time. `compare_stage2` is shared with the GPU-shaped B4.

    python benchmarks/bench_stage2.py [--k 10] [--out bench_stage2.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from refusalscope.artifacts import writable_arg
from refusalscope.interventions.features import FeatureSet
from refusalscope.io.prompts import load_bundled
from refusalscope.methods.direction import mean_differences
from refusalscope.methods.evaluate import refusal_probs
from refusalscope.methods.stage1 import aligned_latents, top_k_set
from refusalscope.methods.stage2 import batched_traces, literal_algorithm1

TAUS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
SEEDS = [0, 1, 2]


def pool_for(model, saes, k: int) -> list:
    """Top-k latents per SAE layer (≥2) aligned with a mean difference at the middle layer."""
    harm = [p.text for p in load_bundled("harmful", split="train")][:32]
    safe = [p.text for p in load_bundled("harmless", split="train")][:32]
    layer = model.n_layers // 2
    r = mean_differences(model, harm, safe, [-1], 16)[0, layer]
    ranked, _ = aligned_latents(saes, r.float(), [l for l in saes.keys() if l >= 2], k)
    return [(f.layer, f.index) for f in top_k_set(ranked, k)]


def compare_stage2(model, saes, prompt: str, pool, batch: int, sync=lambda: None,
                   literal_budget_s: float | None = None) -> dict:
    """Batched traces once, then literal Algorithm 1 for every (τ, seed) one pass at a time.
    With a budget, the literal run stops after the (τ, seed) that crosses it and the remaining
    passes are extrapolated at the measured seconds per pass (reported as such)."""
    t0 = time.perf_counter()
    traces = batched_traces(model, saes, prompt, pool, 5, SEEDS, batch)
    sync()
    batched_s = time.perf_counter() - t0
    rows = sum(len(t.probs) for t in traces)
    calls = []

    def p_fn(ablated):
        calls.append(1)
        plans = [FeatureSet(ablated).plan()] if ablated else None
        return refusal_probs(model, saes, [prompt], plans=plans).item()

    same, done, total = True, 0, len(TAUS) * len(traces)
    t0 = time.perf_counter()
    for tau in TAUS:
        for t in traces:
            if literal_budget_s is not None and time.perf_counter() - t0 > literal_budget_s:
                break
            same &= literal_algorithm1(p_fn, pool, 5, tau, t.seed) == t.selected(tau)
            done += 1
    sync()
    literal_s = time.perf_counter() - t0
    per_run = len(calls) / max(done, 1)  # passes per (τ, seed) are equal: 2 per block
    passes = round(per_run * total)
    literal_full_s = literal_s / max(len(calls), 1) * passes
    batched_passes = -(-rows // batch)
    return {"pool": len(pool), "literal_passes": passes, "literal_s": literal_full_s,
            "literal_runs_timed": f"{done}/{total}", "literal_extrapolated": done < total,
            "batched_rows": rows, "batched_passes": batched_passes, "batched_s": batched_s,
            "pass_ratio": passes / batched_passes, "time_ratio": literal_full_s / batched_s,
            "identical_sets": same, "sets_nonempty": sum(bool(t.selected(x)) for x in TAUS for t in traces)}


def print_stage2(res: dict) -> None:
    for k, v in res.items():
        print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=10, help="latents per layer in the pool")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--out", type=writable_arg, default="bench_stage2.json")
    args = ap.parse_args()
    from bench_ablation import load_world

    model, saes, world = load_world(2048)
    pool = pool_for(model, saes, args.k)
    prompt = load_bundled("harmful", split="test")[0].text
    result = {"world": world, **compare_stage2(model, saes, prompt, pool, args.batch),
              "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_stage2(result)


if __name__ == "__main__":
    main()
