"""Projected wall time of the paper's full run on one GPU, from a B4 result (bench_shapes.py JSON).

The run's cost is forward rows (prompt-length passes: direction scoring, Algorithm 1, recording)
and generated rows (K ladders, τ checks, controls). B4 measured seconds per row of each at the
real shapes (sparse ablation on); this multiplies them by the rows the gemma-2-2b-it preset
spends on D_harmful-sized sets. Counts per prompt are stated below and overridable: the ladder
lengths depend on how soon prompts jailbreak, which no random-weight model can say.

    python benchmarks/project_paper_run.py runs/bench/shapes-gemma-16k.json [--prompts 521]
"""

from __future__ import annotations

import argparse
import json


def per_row_costs(res: dict) -> dict:
    """Seconds per forward row (sparse, middle |S|) and per generated row (largest batch)."""
    rows = res["rows"]
    sizes = sorted({r["S_per_layer"] for r in rows if r["mode"] == "sparse"})
    mid = sizes[len(sizes) // 2]
    fwd = next(r for r in rows if r["mode"] == "sparse" and r["S_per_layer"] == mid)["median_s"] / res["batch"]
    gens = [r for r in rows if r["mode"] == "generate+sparse"]
    best = min(gens, key=lambda r: r["median_s"] / r["batch"])
    s2 = res.get("stage2") or {}
    stage2_row = s2["batched_s"] / s2["batched_rows"] if s2 else fwd
    return {"forward_row_s": fwd, "generated_row_s": best["median_s"] / best["batch"],
            "gen_batch": best["batch"], "stage2_row_s": stage2_row}


def workload(n: int, layers: int, k1_rungs: float, k1_mean: float, k3_rungs: float, coconot: int,
             ce_texts: int) -> list[tuple[str, float, float, str]]:
    """(stage, forward rows, generated rows, what was assumed) for n refused harmful prompts."""
    cand = int(0.8 * layers) - 1  # direction candidate layers ('auto')
    pool = k1_mean * (layers - 2)  # Stage 1 set: K per layer, layers 0-1 excluded
    s2_rows = 3 * (pool / 5 + 1)  # 3 seeds × (m+1) states, N = 5
    return [
        ("filter", n, 0, "P(I) on every prompt"),
        ("direction", 2 * 260 + cand * 64 + n, (4 + 1 + 3) * 32 + n, f"{cand} candidate layers × 64 val rows"),
        ("stage1", 0, n * k1_rungs, f"{k1_rungs:g} K rungs generated per prompt"),
        ("stage2", n * s2_rows, n * 8, f"pool {pool:.0f} → {s2_rows:.0f} rows/prompt; 8 τ checks"),
        ("stage3", 2 * 521, n * (k3_rungs + 4), f"{k3_rungs:g} K rungs + 4 probe rungs per prompt"),
        ("hydra+stage3_only", n, n * (2 + k3_rungs / 2), "active/inactive ablation, recording, ladder"),
        ("controls", 0, n * (3 + 8), "3 random seeds + 8 O'Brien k"),
        ("ce_loss", n * ce_texts * 2 * 4, 0, f"{ce_texts} texts × 2 sets per Stage 2 set (≈4× prompt length)"),
        ("taxonomy+semantics", coconot + 200 * 4, 25, f"{coconot} CoCoNot prompts; 25 clamping rows"),
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("result", help="bench_shapes.py JSON (gemma-2-2b, 16k)")
    ap.add_argument("--prompts", type=int, default=521, help="refused harmful prompts (AdvBench size)")
    ap.add_argument("--k1-rungs", type=float, default=6, help="Stage 1 rungs generated per prompt (2 rounds of 3)")
    ap.add_argument("--k1-mean", type=float, default=30, help="mean K per layer where Stage 1 stops")
    ap.add_argument("--k3-rungs", type=float, default=20, help="Stage 3 rungs per prompt (all of 100..2000)")
    ap.add_argument("--coconot", type=int, default=2586)
    ap.add_argument("--ce-texts", type=int, default=100)
    args = ap.parse_args(argv)
    res = json.load(open(args.result))
    c = per_row_costs(res)
    rows, total = [], 0.0
    for stage, fwd, gen, note in workload(args.prompts, res["layers"], args.k1_rungs, args.k1_mean,
                                          args.k3_rungs, args.coconot, args.ce_texts):
        fwd_cost = c["stage2_row_s"] if stage == "stage2" else c["forward_row_s"]
        s = fwd * fwd_cost + gen * c["generated_row_s"]
        total += s
        rows.append({"stage": stage, "forward_rows": round(fwd), "generated_rows": round(gen), "hours": s / 3600,
                     "assumed": note})
    out = {"source": args.result, "device": res["device"], "costs": c, "prompts": args.prompts,
           "stages": rows, "total_hours": total / 3600}
    print(f"Projected paper run: {res['arch']} × {res['d_sae']} SAEs at {res['layers']} layers on {res['device']}, "
          f"{args.prompts} prompts (per forward row {c['forward_row_s'] * 1e3:.2f} ms, per Stage 2 row "
          f"{c['stage2_row_s'] * 1e3:.2f} ms, per generated row {c['generated_row_s'] * 1e3:.1f} ms "
          f"at batch {c['gen_batch']})")
    print(f"{'stage':<20}{'fwd rows':>10}{'gen rows':>10}{'hours':>8}  assumed")
    for r in rows:
        print(f"{r['stage']:<20}{r['forward_rows']:>10}{r['generated_rows']:>10}{r['hours']:>8.2f}  {r['assumed']}")
    print(f"{'total':<40}{out['total_hours']:>8.2f}")
    return out


if __name__ == "__main__":
    main()
