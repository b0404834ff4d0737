"""Pipeline stages `stage1` (K ladder) and `stage2` (Algorithm 1 over τ × seeds), resumable per
prompt, with the paper's Table 1."""

from __future__ import annotations

import time

import pandas as pd

from ..methods.ladder import ladder
from ..methods.records import Stage2Record
from ..methods.stage1 import aligned_latents
from . import plots
from .backend import fan_out
from .pipeline import Context, stage_hash


def stage1_layers(ctx: Context) -> list[int]:
    return [l for l in ctx.saes.keys() if l not in set(ctx.cfg.stage1.exclude_layers)]


def run_stage1(ctx: Context) -> dict:
    name = "stage1"
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.status(name)["summary"]
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
        return ctx.store.status(name)["summary"]
    s2 = ctx.cfg.stage2
    k_of = {pid: r.k for pid, r in ctx.results.stage1().items() if r.k is not None}
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
        table1 = table_one(records, len(ctx.results.kept_prompts()))
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


def table_one(records: list[Stage2Record], n_refused: int) -> dict:
    """Paper Table 1: unique latents, jailbroken / refused prompts, mean set size, and the share
    of each prompt's set that is inactive (zero at every prompt token) on that prompt."""
    sets = [r for r in records if r.set is not None]
    sizes = [len(r.set) for r in sets]
    inactive = [r.inactive for r in sets if r.inactive is not None]
    return {"unique_latents": len({f for r in sets for f in r.set}), "jailbroken": len(sets),
            "refused": n_refused, "stage1_jailbroken": len(records),
            "mean_set_size": round(sum(sizes) / max(1, len(sizes)), 2),
            "inactive_share": round(sum(len(v) for v in inactive) / max(1, sum(sizes)), 4),
            "inactive_latents_unique": len({f for v in inactive for f in v})}
