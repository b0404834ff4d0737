"""Pipeline stages `stage1` (K ladder) and `stage2` (Algorithm 1 over τ × seeds), resumable per
prompt, with the paper's Table 1."""

from __future__ import annotations

import time

import pandas as pd

from ..interventions.engine import intervene
from ..interventions.spec import Recording
from ..methods.stage1 import aligned_latents, ladder
from . import plots
from .backend import fan_out
from .pipeline import Context, kept_prompts, stage_hash
from .stage_direction import load_direction
from .store import read_jsonl, read_tensors


def stage1_layers(ctx: Context) -> list[int]:
    return [l for l in ctx.saes.keys() if l not in set(ctx.cfg.stage1.exclude_layers)]


def run_stage1(ctx: Context) -> dict:
    name = "stage1"
    h = stage_hash(ctx, name, ("saes", "judge", "generation", "stage1"), ("direction",))
    if ctx.store.is_done(name, h):
        return ctx.store.status(name)["summary"]
    s1 = ctx.cfg.stage1
    direction, _ = load_direction(ctx)
    layers = stage1_layers(ctx)
    ranked, cosines = aligned_latents(ctx.saes, direction, layers, s1.k_max)
    prompts = kept_prompts(ctx)
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


def stage1_candidates(ctx: Context) -> tuple[dict[str, int], dict]:
    recs = read_jsonl(ctx.store.path("stage1", "results.jsonl"))
    t = read_tensors(ctx.store.path("stage1", "ranked.safetensors"))
    ranked = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("index.")}
    return {r["id"]: r["k"] for r in recs if r["k"] is not None}, ranked


def run_stage2(ctx: Context) -> dict:
    name = "stage2"
    h = stage_hash(ctx, name, ("judge", "generation", "stage2"), ("stage1",))
    if ctx.store.is_done(name, h):
        return ctx.store.status(name)["summary"]
    s2 = ctx.cfg.stage2
    k_of, ranked = stage1_candidates(ctx)
    prompts = [p for p in kept_prompts(ctx) if p.id in k_of]
    with ctx.store.stage(name, h) as st:
        ck = st.checkpoint("sets", key="id")
        ctx.log(f"stage 2: Algorithm 1 on {len(prompts)} prompts (N={s2.block_size}, "
                f"{len(s2.taus)} thresholds, seeds {s2.seeds})")
        t0, passes = time.perf_counter(), {"literal_sequential": 0, "batched_sequential": 0, "batched_rows": 0}
        fan_out(ctx, "stage2", [(p.id, p.text, k_of[p.id]) for p in prompts], {"ranked": ranked}, ck,
                "stage 2 (Algorithm 1)")
        records = [ck.records[p.id] for p in prompts]
        for r in records:
            for k in passes:
                passes[k] += r["passes"][k]
        table1, inactive = table_one(ctx, prompts, records, len(kept_prompts(ctx)))
        st.jsonl("sets.jsonl", [{**r, "inactive": inactive.get(r["id"])} for r in records])
        rows = [{"id": r["id"], **{k: t[k] for k in ("tau", "size", "jailbroken")}}
                for r in records for t in r["per_tau"]]
        frame = pd.DataFrame(rows, columns=["id", "tau", "size", "jailbroken"])
        st.table("per_tau.parquet", frame)
        if len(frame):
            plots.stage2_sizes(frame, st.file("tau_sweep.png"))
        st.json("table1.json", table1)
        st.summary = {**table1, "forward_passes": passes, "seconds": round(time.perf_counter() - t0, 1)}
    ctx.log(f"stage 2: {table1['jailbroken']} of {table1['refused']} refused prompts jailbroken; "
            f"{table1['unique_latents']} unique latents, mean set size {table1['mean_set_size']}")
    return st.summary


def table_one(ctx: Context, prompts, records, n_refused: int) -> tuple[dict, dict]:
    """Paper Table 1: unique latents, jailbroken / refused prompts, mean set size, and the share
    of each prompt's set that is inactive (zero at every prompt token) on that prompt."""
    sets = {r["id"]: r["set"] for r in records if r["set"]}
    inactive = {}
    for p in prompts:
        feats = sets.get(p.id)
        if not feats:
            continue
        ids = [tuple(int(x) for x in f.split("-")) for f in feats]
        by_layer: dict[int, list[int]] = {}
        for l, i in ids:
            by_layer.setdefault(l, []).append(i)
        rec = Recording(by_layer)
        with intervene(ctx.model, ctx.saes, record=rec):
            ctx.model.logits(ctx.model.encode([p.text]))
        acts = rec.max_activation(1)
        zero = [f"{l}-{i}" for l, ii in by_layer.items() for c, i in enumerate(ii) if acts[l][0, c] <= 0]
        inactive[p.id] = zero
    unique = {f for s in sets.values() for f in s}
    sizes = [len(s) for s in sets.values()]
    total = sum(sizes)
    return {"unique_latents": len(unique), "jailbroken": len(sets), "refused": n_refused,
            "stage1_jailbroken": len(prompts),
            "mean_set_size": round(sum(sizes) / max(1, len(sizes)), 2),
            "inactive_share": round(sum(len(v) for v in inactive.values()) / max(1, total), 4),
            "inactive_latents_unique": len({f for v in inactive.values() for f in v})}, inactive
