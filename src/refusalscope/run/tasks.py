"""Per-shard work a backend runs, in this process or on a Ray worker. A task takes the worker's
Context (model, SAEs, judge, config), a shard of items whose first element is the prompt id, and
a payload shared by every shard; it returns one JSON-able record per prompt (the `to_json` of a
typed record where one exists). Nothing here touches the run store: the driver writes what
comes back."""

from __future__ import annotations

from ..interventions.features import FeatureSet
from ..measures.judges import make_judge
from ..methods import controls, hydra
from ..methods import latent_effects as effects
from ..methods.activity import activity
from ..methods.ce_loss import TextSet, loss_sum
from ..methods.eval_matrix import evaluate_prompts
from ..methods.records import Stage3Record
from ..methods.stage1 import search_k, top_k_set
from ..methods.stage2 import minimal_sets
from ..methods.stage3 import probe_sweep as stage3_sweep
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
    """Algorithm 1 over every τ and seed per (id, text, K) prompt, the states and τ-set
    generations of the whole shard batched together; the smallest jailbreaking set, and which of
    its latents fire on the plain prompt (one batched forward per shard)."""
    s2, g = ctx.cfg.stage2, ctx.cfg.generation
    out = minimal_sets(ctx.model, ctx.saes, [(pid, text, top_k_set(p["ranked"], k)) for pid, text, k in items],
                       ctx.judge, block_size=s2.block_size, taus=s2.taus, seeds=s2.seeds, batch_size=s2.batch_size,
                       max_new_tokens=g.max_new_tokens, generation_batch_size=g.batch_size)
    sets = {r.id: r.set for r in out if r.set is not None}
    act = activity(ctx.model, ctx.saes, [(pid, t) for pid, t, _ in items if pid in sets], sets,
                   ctx.cfg.model.batch_size)
    for r in out:
        if r.id in act:
            r.active, r.inactive = act[r.id].active, act[r.id].inactive
    return [r.to_json() for r in out]


def stage3(ctx, items, p) -> list[dict]:
    """Stage 2 active latents + the top-K of the prompt's Stage 3 ranking: smallest jailbreaking K."""
    sc = ctx.cfg.stage3
    rankings = {pid: p["rankings"].get(pid, []) for pid, _ in items}
    res = stage3_search(ctx.model, ctx.saes, items, p["active2"], rankings, sc.ks, judge=ctx.judge,
                        rungs_per_round=sc.rungs_per_round, quiet=True, **_gen(ctx))
    return [Stage3Record(r.id, r.k, r.tried, r.completions, r.verdicts,
                         FeatureSet(p["active2"].get(r.id, ()))).to_json() for r in res]


def probe_sweep(ctx, items, p) -> list[dict]:
    """FM vs probe: per prompt, jailbroken or not at every `stage3.probe_ks` K (sorted), for the
    probe's shared ranking and the prompt's own FM ranking."""
    sweep = stage3_sweep(ctx.model, ctx.saes, items, p["active2"], p["probe"],
                         {pid: p["fm"].get(pid, []) for pid, _ in items}, ctx.cfg.stage3.probe_ks, judge=ctx.judge,
                         **_gen(ctx))
    return [{"id": pid, **{name: [bool(x) for x in v[i]] for name, v in sweep.jailbroken.items()}}
            for i, (pid, _) in enumerate(items)]


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


def latent_effects(ctx, items, p) -> list[dict]:
    """P("I") with each critical latent ablated alone (and left out of its Stage 2 set)."""
    return effects.latent_effects(ctx.model, ctx.saes, items, p["pairs"], p["sets"], ctx.cfg.model.batch_size)


def _plan(p, name: str):
    return p["interventions"][name].plan(p["direction"], p["vector"], p["layer"], p["positions"])


def _harmless_judge(ctx, name: str | None):
    """A second judge for harmless prompts, built once per process like `ctx.judge`."""
    if name is None:
        return None
    cache = ctx.__dict__.setdefault("_eval_judges", {})
    if name not in cache:
        cache[name] = make_judge(name, ctx.cfg.judge.degenerate_is_jailbreak)
    return cache[name]


def eval_prompts(ctx, items, p) -> list[dict]:
    """One (intervention, dataset, chunk) per item: per prompt, the reply, verdict, P(I) and KL."""
    return [{"id": key, "rows": evaluate_prompts(ctx.model, ctx.saes, p["chunks"][(ds, ci)], _plan(p, iv), ctx.judge,
                                                 _harmless_judge(ctx, p["harmless_judge"]), p["max_new_tokens"],
                                                 ctx.cfg.generation.batch_size)}
            for key, iv, ds, ci in items]


def eval_ce(ctx, items, p) -> list[dict]:
    """One intervention per item: summed CE over the general texts and the token count."""
    out = []
    for key, iv in items:
        s, n = loss_sum(ctx.model, ctx.saes, TextSet("general", p["texts"]), _plan(p, iv), ctx.cfg.model.batch_size)
        out.append({"id": key, "sum": s, "tokens": n})
    return out


TASKS = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "probe_sweep": probe_sweep,
         "inactive_critical": inactive_critical,
         "random_control": random_control, "obrien": obrien, "stage3_only": stage3_only,
         "latent_effects": latent_effects, "eval_prompts": eval_prompts, "eval_ce": eval_ce}
