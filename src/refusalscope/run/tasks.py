"""Per-shard work a backend runs, in this process or on a Ray worker. A task takes the worker's
Context (model, SAEs, judge, config), a shard of items whose first element is the prompt id, and
a payload shared by every shard; it returns one JSON-able record per prompt. Nothing here touches
the run store: the driver writes what comes back."""

from __future__ import annotations

from ..interventions.spec import FeatureAblation
from ..methods import controls, hydra
from ..methods.evaluate import generate_judged
from ..methods.stage1 import search_k, top_k_set
from ..methods.stage2 import batched_traces, consensus, forward_passes
from ..methods.stage3 import stage3_search


def _gen(ctx) -> dict:
    g = ctx.cfg.generation
    return {"max_new_tokens": g.max_new_tokens, "batch_size": g.batch_size}


def stage1(ctx, items, p) -> list[dict]:
    """Smallest jailbreaking K of the top-K-per-layer ladder, per prompt."""
    s1 = ctx.cfg.stage1
    res = search_k(ctx.model, ctx.saes, items, p["ranked"], p["ks"], ctx.judge, rungs_per_round=s1.rungs_per_round,
                   positions=s1.positions, quiet=True, **_gen(ctx))
    return [{"id": r.prompt_id, "k": r.k, "tried": r.tried,
             "completions": {str(k): v for k, v in r.completions.items()},
             "verdicts": {str(k): v for k, v in r.verdicts.items()}} for r in res]


def stage2(ctx, items, p) -> list[dict]:
    """Algorithm 1 over every τ and seed per (id, text, K) prompt, and the smallest jailbreaking set."""
    s2, judge = ctx.cfg.stage2, ctx.judge
    out = []
    for pid, text, k in items:
        cands = [(l, i) for l, ids in top_k_set(p["ranked"], k).items() for i in ids]
        traces = batched_traces(ctx.model, ctx.saes, text, cands, s2.block_size, s2.seeds, s2.batch_size)
        by_tau = {tau: sorted(consensus(traces, tau)) for tau in s2.taus}
        distinct = sorted({tuple(v) for v in by_tau.values() if v}, key=len)
        j = generate_judged(ctx.model, ctx.saes, [text] * len(distinct),
                            [[FeatureAblation.from_ids(s)] for s in distinct], judge, **_gen(ctx))
        verdict = {s: (c, jb) for s, c, jb in zip(distinct, j.completions, j.jailbroken)}
        per_tau = [{"tau": tau, "size": len(v), "jailbroken": bool(v) and verdict[tuple(v)][1],
                    "completion": verdict[tuple(v)][0] if v else None,
                    "features": [f"{l}-{i}" for l, i in v]} for tau, v in by_tau.items()]
        wins = [t for t in per_tau if t["jailbroken"]]
        best = min(wins, key=lambda t: (t["size"], -t["tau"])) if wins else None
        out.append({"id": pid, "candidates": len(cands), "per_tau": per_tau,
                    "deltas": {str(t.seed): t.deltas for t in traces},
                    "set": best["features"] if best else None, "tau": best["tau"] if best else None,
                    "passes": forward_passes(len(cands), s2.block_size, len(s2.seeds), len(s2.taus),
                                             s2.batch_size)})
    return out


def stage3(ctx, items, p) -> list[dict]:
    """Stage 2 active latents + top-K Stage 3 latents: smallest jailbreaking K per prompt."""
    sc = ctx.cfg.stage3
    res = stage3_search(ctx.model, ctx.saes, items, p["active2"], p["top"], sc.ks, judge=ctx.judge,
                        rungs_per_round=sc.rungs_per_round, quiet=True, **_gen(ctx))
    return [{"id": r.prompt_id, "k": r.k, "tried": r.tried,
             "completion": r.completions.get(r.k) if r.k else None} for r in res]


def inactive_critical(ctx, items, p) -> list[dict]:
    return hydra.inactive_critical(ctx.model, ctx.saes, items, p["sets"], p["activity"], ctx.judge,
                                   **_gen(ctx))["records"]


def _by_prompt(items, rows) -> list[dict]:
    return [{"id": pid, "rows": [r for r in rows if r["id"] == pid]} for pid, _ in items]


def random_control(ctx, items, p) -> list[dict]:
    rows = controls.random_control(ctx.model, ctx.saes, items, p["sets"], ctx.judge, seeds=p["seeds"],
                                   **_gen(ctx))["records"]
    return _by_prompt(items, rows)


def obrien(ctx, items, p) -> list[dict]:
    rows = controls.obrien_baseline(ctx.model, ctx.saes, items, ctx.judge, ks=p["ks"], **_gen(ctx))["records"]
    return _by_prompt(items, rows)


def stage3_only(ctx, items, p) -> list[dict]:
    return controls.stage3_only(ctx.model, ctx.saes, items, p["stage3_sets"], p["active_stage2"], ctx.judge,
                                **_gen(ctx))["records"]


TASKS = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "inactive_critical": inactive_critical,
         "random_control": random_control, "obrien": obrien, "stage3_only": stage3_only}
