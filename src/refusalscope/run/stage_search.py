"""Pipeline stages `stage1` (K ladder) and `stage2` (Algorithm 1 over τ × seeds), resumable per
prompt, with the paper's Table 1."""

from __future__ import annotations

import time

import pandas as pd

from ..errors import UserError
from ..methods.activity import activity
from ..methods.ladder import ladder
from ..methods.records import Stage2Record
from ..methods.stage1 import aligned_latents, search_k, top_k_set
from ..methods.stage2 import minimal_sets
from . import plots
from .backend import fan_out
from .pipeline import Context, generation_args, stage_hash
from .stage_spec import Stage, StageInputs


def stage1_layers(ctx: Context) -> list[int]:
    """SAE layers searched in Stage 1: `stage1.layers` ("to_lstar": up to the direction's layer
    l*, as the paper's Stage 3 and human study draw from layers 2..l*; "all"; or a list) minus
    `stage1.exclude_layers` (the paper drops the first layers, which carry grammar)."""
    s1 = ctx.cfg.stage1
    layers = sorted(ctx.saes.keys())
    if s1.layers == "to_lstar":
        _, lstar = ctx.results.direction()
        layers = [l for l in layers if l <= lstar]
    elif s1.layers != "all":
        missing = sorted(set(s1.layers) - set(layers))
        if missing:
            raise UserError(f"stage1.layers has {missing}, which have no SAE (SAE layers: {layers}): "
                            "fix stage1.layers or saes.layers")
        layers = sorted(set(s1.layers))
    out = [l for l in layers if l not in set(s1.exclude_layers)]
    if not out:
        raise UserError(f"no Stage 1 layers left (SAE layers {sorted(ctx.saes.keys())}, stage1.layers "
                        f"{s1.layers}, excluded {s1.exclude_layers}): widen stage1.layers or exclude fewer")
    return out


def run_stage1(ctx: Context) -> dict:
    name = "stage1"
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.recorded(name)["summary"]
    s1 = ctx.cfg.stage1
    direction, _ = ctx.results.direction()
    layers = stage1_layers(ctx)
    ranked, cosines = aligned_latents(ctx.saes, direction, layers, s1.k_max)
    prompts = ctx.results.kept_prompts()
    with ctx.store.stage(name, h) as st:
        st.tensors("ranked.safetensors", {**{f"index.{l}": r for l, r in ranked.items()},
                                          **{f"cos.{l}": c for l, c in cosines.items()}},
                   metadata={"layers": layers})
        ck = st.checkpoint("results", key="id")
        todo = [(p.id, p.text) for p in prompts if p.id not in ck]
        ctx.log(f"stage 1: {len(prompts)} refused prompts ({len(prompts) - len(todo)} done before), "
                f"{len(layers)} SAE layers, K = {s1.k_start}..{s1.k_max}")
        t0 = time.perf_counter()
        fan_out(ctx, "stage1", todo, {"ranked": ranked, "ks": ladder(s1.k_start, s1.k_step, s1.k_max)},
                ck, "stage 1 (K ladder)")
        records = [ck.records[p.id] for p in prompts]
        st.jsonl("results.jsonl", records)
        ks = [r["k"] for r in records]
        found = [k for k in ks if k is not None]
        plots.k_distribution(ks, s1.k_max, st.file("k_distribution.png"))
        st.summary = {"prompts": len(ks), "jailbroken": len(found),
                      "jailbroken_share": round(len(found) / max(1, len(ks)), 4),
                      "k_mean": round(sum(found) / max(1, len(found)), 2),
                      "k_histogram": {str(k): found.count(k) for k in sorted(set(found))},
                      "layers": layers, "seconds": round(time.perf_counter() - t0, 1)}
    ctx.log(f"stage 1: {len(found)} of {len(ks)} prompts jailbroken by top-K ablation")
    return st.summary


def run_stage2(ctx: Context) -> dict:
    name = "stage2"
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.recorded(name)["summary"]
    s2 = ctx.cfg.stage2
    stage1 = ctx.results.stage1()
    k_of = {pid: r.k for pid, r in stage1.items() if r.k is not None}
    n_stage1 = len(k_of)
    if s2.unbroken == "k_max":  # the paper's Llama: prune the whole pool even where it degenerates
        k_of.update({pid: ctx.cfg.stage1.k_max for pid, r in stage1.items() if r.k is None})
    ranked = ctx.results.stage1_ranked()
    prompts = [p for p in ctx.results.kept_prompts() if p.id in k_of]
    with ctx.store.stage(name, h) as st:
        ck = st.checkpoint("sets", key="id")
        ctx.log(f"stage 2: Algorithm 1 on {len(prompts)} prompts (N={s2.block_size}, "
                f"{len(s2.taus)} thresholds, seeds {s2.seeds})")
        t0, passes = time.perf_counter(), {"literal_sequential": 0, "batched_sequential": 0, "batched_rows": 0}
        fan_out(ctx, "stage2", [(p.id, p.text, k_of[p.id]) for p in prompts], {"ranked": ranked}, ck,
                "stage 2 (Algorithm 1)")
        records = [Stage2Record.from_json(ck.records[p.id]) for p in prompts]
        for r in records:
            for k in passes:
                passes[k] += r.passes[k]
        table1 = table_one(records, len(ctx.results.kept_prompts()), n_stage1)
        st.jsonl("sets.jsonl", [r.to_json() for r in records])
        rows = [{"id": r.id, "tau": t.tau, "size": t.size, "jailbroken": t.jailbroken}
                for r in records for t in r.per_tau]
        frame = pd.DataFrame(rows, columns=["id", "tau", "size", "jailbroken"])
        st.table("per_tau.parquet", frame)
        if len(frame):
            plots.stage2_sizes(frame, st.file("tau_sweep.png"))
        st.json("table1.json", table1)
        st.summary = {**table1, "forward_passes": passes, "seconds": round(time.perf_counter() - t0, 1)}
    ctx.log(f"stage 2: {table1['jailbroken']} of {table1['refused']} refused prompts jailbroken; "
            f"{table1['unique_latents']} unique latents, mean set size {table1['mean_set_size']}")
    return st.summary


def table_one(records: list[Stage2Record], n_refused: int, n_stage1: int | None = None) -> dict:
    """Paper Table 1: unique latents, jailbroken / refused prompts, mean set size, and the share
    of each prompt's set that is inactive (zero at every prompt token) on that prompt.
    `stage1_jailbroken`: prompts Stage 1 jailbroke; `stage2_prompts`: prompts Algorithm 1 ran on
    (more than those with `stage2.unbroken: k_max`)."""
    sets = [r for r in records if r.set is not None]
    found = [r.set for r in records if r.set is not None]
    sizes = [len(s) for s in found]
    inactive = [r.inactive for r in sets if r.inactive is not None]
    return {"unique_latents": len({f for s in found for f in s}), "jailbroken": len(sets),
            "refused": n_refused, "stage1_jailbroken": len(records) if n_stage1 is None else n_stage1,
            "stage2_prompts": len(records),
            "mean_set_size": round(sum(sizes) / max(1, len(sizes)), 2),
            "inactive_share": round(sum(len(v) for v in inactive) / max(1, sum(sizes)), 4),
            "inactive_latents_unique": len({f for v in inactive for f in v})}


def stage1_task(ctx, items, p) -> list[dict]:
    """Smallest jailbreaking K of the top-K-per-layer ladder, per prompt."""
    s1 = ctx.cfg.stage1
    res = search_k(ctx.model, ctx.saes, items, p["ranked"], p["ks"], ctx.judge, rungs_per_round=s1.rungs_per_round,
                   positions=s1.positions, quiet=True, **generation_args(ctx))
    return [r.to_json() for r in res]


def stage2_task(ctx, items, p) -> list[dict]:
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


SAE_WEIGHTS = ("saes.source", "saes.release", "saes.sae_id", "saes.path", "saes.layers")
STAGE1 = Stage("stage1", "core", StageInputs((*SAE_WEIGHTS, "judge", "generation", "stage1"), (), ("direction",)),
               run_stage1, {"stage1": stage1_task})
STAGE2 = Stage("stage2", "core", StageInputs(("model.batch_size", "judge", "generation", "stage2"), (), ("stage1",)),
               run_stage2, {"stage2": stage2_task})
