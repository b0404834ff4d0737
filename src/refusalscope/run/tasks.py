"""Per-shard work a backend runs, in this process or on a Ray worker. A task takes the worker's
Context (model, SAEs, judge, config), a shard of items whose first element is the prompt id, and
a payload shared by every shard; it returns one JSON-able record per prompt (the `to_json` of a
typed record where one exists). Nothing here touches the run store: the driver writes what
comes back."""

from __future__ import annotations

from ..interventions.features import FeatureSet
from ..methods import controls, hydra
from ..methods.activity import activity
from ..methods.evaluate import generate_judged
from ..methods.records import Stage2Record, Stage3Record, TauOutcome
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
    return [r.to_json() for r in res]


def stage2(ctx, items, p) -> list[dict]:
    """Algorithm 1 over every τ and seed per (id, text, K) prompt, the smallest jailbreaking set,
    and which of its latents fire on the plain prompt (one batched forward per shard)."""
    out = [_algorithm1(ctx, pid, text, top_k_set(p["ranked"], k)) for pid, text, k in items]
    sets = {r.id: r.set for r in out if r.set is not None}
    act = activity(ctx.model, ctx.saes, [(pid, t) for pid, t, _ in items if pid in sets], sets,
                   ctx.cfg.model.batch_size)
    for r in out:
        if r.id in act:
            r.active, r.inactive = act[r.id].active, act[r.id].inactive
    return [r.to_json() for r in out]


def _algorithm1(ctx, pid: str, text: str, cands: FeatureSet) -> Stage2Record:
    s2 = ctx.cfg.stage2
    traces = batched_traces(ctx.model, ctx.saes, text, list(cands), s2.block_size, s2.seeds, s2.batch_size)
    by_tau = {tau: FeatureSet(sorted(consensus(traces, tau))) for tau in s2.taus}
    distinct = sorted({s for s in by_tau.values() if s}, key=lambda s: (len(s), s.ids()))
    j = generate_judged(ctx.model, ctx.saes, [text] * len(distinct), [s.plan() for s in distinct],
                        ctx.judge, **_gen(ctx))
    verdict = {s: (c, jb, v.judge) for s, c, jb, v in zip(distinct, j.completions, j.jailbroken, j.verdicts())}
    per_tau = [TauOutcome(tau, s, bool(s) and verdict[s][1], verdict[s][0] if s else None,
                          verdict[s][2] if s else None) for tau, s in by_tau.items()]
    wins = [t for t in per_tau if t.jailbroken]
    best = min(wins, key=lambda t: (t.size, -t.tau)) if wins else None
    return Stage2Record(pid, len(cands), per_tau, {t.seed: t.deltas for t in traces},
                        forward_passes(len(cands), s2.block_size, len(s2.seeds), len(s2.taus), s2.batch_size),
                        best.features if best else None, best.tau if best else None)


def stage3(ctx, items, p) -> list[dict]:
    """Stage 2 active latents + the top-K of the prompt's Stage 3 ranking: smallest jailbreaking K."""
    sc = ctx.cfg.stage3
    rankings = {pid: p["rankings"].get(pid, []) for pid, _ in items}
    res = stage3_search(ctx.model, ctx.saes, items, p["active2"], rankings, sc.ks, judge=ctx.judge,
                        rungs_per_round=sc.rungs_per_round, quiet=True, **_gen(ctx))
    return [Stage3Record(r.id, r.k, r.tried, r.completions, r.verdicts,
                         FeatureSet(p["active2"].get(r.id, ()))).to_json() for r in res]


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
