"""Pipeline stage `stage3` (interaction discovery): the factorization machine over SAE
activations, the ranking of new latents by embedding similarity to Stage 2 latents (per prompt
against its own set, or one global ranking), the ablation sweep (paper Table 2), and the
linear-probe comparison."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..interventions.features import FeatureSet
from ..methods.fm import FMResult, embedding_collapse, rank_by_embedding_similarity, rank_per_prompt, train_fm
from ..methods.fm_data import FMDataset, collect_sae_activations, feature_array, fm_dataset
from ..methods.probe import rank_by_weight, train_probe
from ..methods.records import Stage3Record
from ..methods.stage3 import SweepResult, stage3_search
from ..methods.stage3 import probe_sweep as stage3_sweep
from .backend import fan_out
from .pipeline import Context, generation_args, stage_hash
from .resolve import load_prompt_set, take
from .stage_spec import Stage, StageInputs


def fm_layers(ctx: Context) -> list[int]:
    sc = ctx.cfg.stage3
    if sc.layers != "auto":
        return list(sc.layers)
    _, lstar = ctx.results.direction()
    layers = [l for l in ctx.saes.keys() if 2 <= l <= lstar]
    if not layers:  # l* sits below layer 2 (small models): take every SAE layer up to l*
        layers = [l for l in ctx.saes.keys() if l <= max(lstar, min(ctx.saes.keys()))]
    return layers


def _texts(specs: list[str], cap: int | None, tf, seed: int) -> list[str]:
    return take([p.text for s in specs for p in load_prompt_set(s, tf)], cap, seed)


def run_stage3(ctx: Context) -> dict:
    name = "stage3"
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.recorded(name)["summary"]
    sc, model, saes = ctx.cfg.stage3, ctx.model, ctx.saes
    tf = ctx.cfg.data.text_field
    harmful, harmless = (
        _texts(sc.harmful, sc.n_per_class, tf, ctx.cfg.seed),
        _texts(sc.harmless, sc.n_per_class, tf, ctx.cfg.seed),
    )
    n = min(len(harmful), len(harmless))
    # equal numbers per label, a seeded draw from the larger set (paper: "an equal number of random
    # samples from alpaca")
    harmful, harmless = take(harmful, n, ctx.cfg.seed), take(harmless, n, ctx.cfg.seed)
    layers = fm_layers(ctx)
    sets = ctx.results.stage2_sets()
    s2_union = sorted({f for s in sets.values() for f in s})
    device = model.device
    with ctx.store.stage(name, h) as st:
        t0 = time.perf_counter()
        ctx.log(f"stage 3: SAE activations of {n} harmful + {n} harmless prompts at layers "
                f"{layers[0]}..{layers[-1]} (last {sc.n_tokens} tokens, {sc.mode})")
        acts = []
        for label, ps in (("harmful", harmful), ("harmless", harmless)):
            shard = lambda a, b, label=label: st.store.path(name, f"acts-{label}-{a:06d}-{b:06d}.partial.safetensors")  # noqa: E731
            a = collect_sae_activations(model, saes, ps, layers, sc.n_tokens, ctx.cfg.model.batch_size, ctx.quiet,
                                        sc.mode, shard_file=shard)
            a.save(st.file(f"acts_{label}.safetensors"))
            acts.append(a)
        data = fm_dataset(acts[0], acts[1], ctx.cfg.seed)
        del acts, a  # the splits hold the rows from here on
        fit: dict[str, Any] = dict(lr=sc.lr, epochs=sc.epochs, batch_size=sc.batch_size, seed=ctx.cfg.seed,
                                   scale=sc.scale, device=device, quiet=ctx.quiet)
        res = _fit_once(st, sc.embedding_size, data, fit, test=True)
        collapse = {sc.embedding_size: embedding_collapse(res.model, seed=ctx.cfg.seed)}
        for k in sc.collapse_sizes:  # the paper's other sizes, on the same collected data
            collapse[k] = embedding_collapse(_fit_once(st, k, data, fit).model, seed=ctx.cfg.seed)
        st.tensors("fm.safetensors", {**{k: v for k, v in res.model.state_dict().items()},
                                      "columns": torch.from_numpy(feature_array(data.columns)),
                                      "scale": torch.from_numpy(res.scale),
                                      "support": torch.from_numpy(data.support)})
        prompts = [(p.id, p.text) for p in ctx.results.kept_prompts()]
        depth = max(max(sc.ks), max(sc.probe_ks))
        rankable = data.support >= sc.min_support
        rankings, how = stage3_rankings(res.model, data.columns, sets, s2_union, [pid for pid, _ in prompts],
                                        depth, sc.ranking, sc.aggregate, rankable)
        if sc.ranking == "global":
            top = next(iter(rankings.values()), [])
            st.table("ranking.parquet", pd.DataFrame({"feature": [f.id for f, _ in top],
                                                      "similarity": [s for _, s in top]}))
        else:
            st.table("rankings.parquet", rankings_frame(rankings))
        probe = train_probe(data.train, data.test, data.val, seed=ctx.cfg.seed)
        probe_ranked = rank_by_weight(probe, data.columns, exclude=set(s2_union))[:max(sc.probe_ks)]
        active2 = ctx.results.active_stage2()
        ids = {pid: [f.id for f, _ in r] for pid, r in rankings.items()}
        ck = st.checkpoint("results", key="id")
        fan_out(ctx, "stage3", prompts, {"active2": active2, "rankings": ids}, ck, "stage 3 (K ladder)")
        records = [Stage3Record.from_json(ck.records[pid]) for pid, _ in prompts]
        st.jsonl("results.jsonl", [r.to_json() for r in records])
        sweep_ck = st.checkpoint("probe_sweep", key="id")
        fan_out(ctx, "probe_sweep", prompts, {"active2": active2, "probe": [f.id for f, _ in probe_ranked],
                                              "fm": ids}, sweep_ck, "stage 3 (FM vs probe)")
        vs = SweepResult([pid for pid, _ in prompts], sorted(set(sc.probe_ks)),
                         {r: np.array([sweep_ck.records[pid][r] for pid, _ in prompts], dtype=bool).reshape(
                             len(prompts), -1) for r in ("probe", "fm")}).counts()
        st.table("probe_vs_fm.parquet", vs)
        found = [r.k for r in records if r.k is not None]
        st.summary = {
            "fm": {"train_acc": res.train_acc, "val_acc": res.val_acc, "test_acc": res.test_acc,
                   "test_prompt_acc": res.prompt_accuracy(data.test), "mode": sc.mode, "scale": sc.scale,
                   "best_epoch": res.best_epoch, "columns": len(data.columns), "rows": len(data.train)
                   + len(data.val) + len(data.test), "nnz": int(data.train.X.nnz + data.val.X.nnz + data.test.X.nnz),
                   "device": str(device), "collapse": {str(k): round(v, 4) for k, v in collapse.items()}},
            "probe": {"train_acc": probe.train_acc, "test_acc": probe.test_acc},
            "ranking": {"mode": sc.ranking, "aggregate": sc.aggregate, **how, **_support(data, sc.min_support)},
            "table2": {"refused": len(prompts), "jailbroken": len(found),
                       "mean_k": round(sum(found) / max(1, len(found)), 1),
                       "unique_stage3_latents": len({f for r in records if r.k for f in ids[r.id][: r.k]}),
                       "k_histogram": {str(k): found.count(k) for k in sorted(set(found))}},
            "probe_vs_fm": vs.to_dict(orient="records"), "layers": layers,
            "seconds": round(time.perf_counter() - t0, 1)}
        for partial in st.store.path(name, "").glob("*.partial.safetensors"):  # merged above: drop the shards
            partial.unlink()
    t2 = st.summary["table2"]
    ctx.log(f"stage 3: FM test accuracy {res.test_acc:.3f}; {t2['jailbroken']} of {t2['refused']} "
            f"prompts jailbroken with Stage 2 + top-K Stage 3 latents ({sc.ranking} ranking)")
    return st.summary


def _fit_once(st, k: int, data: FMDataset, fit: dict, test: bool = False) -> FMResult:
    """The FM of embedding size k, read from its checkpoint when an interrupted run trained it
    already (the same weights a fresh fit gives on the CPU), else trained and checkpointed."""
    path = st.store.path(st.stage, f"fm-k{k}.partial.safetensors")
    if path.exists():
        return FMResult.load(path, fit["device"])
    res = train_fm(data.train, data.val, data.test if test else None, k=k, **fit)
    res.save(path)
    return res


def _support(data: FMDataset, min_support: int) -> dict:
    """How many latents the ranking saw, had as FM columns, and left out (too rarely in train rows)."""
    ranked = int((data.support >= min_support).sum())
    return {"min_support": min_support, "latents_seen": data.n_seen, "fm_columns": len(data.columns),
            "ranked_latents": ranked, "excluded_latents": data.n_seen - ranked}


def stage3_rankings(fm, columns, sets: dict, union: list, prompt_ids: list[str], depth: int, mode: str,
                    aggregate: str, rankable=None) -> tuple[dict[str, list], dict]:
    """Each prompt's ranked Stage 3 latents (up to `depth`): against its own Stage 2 set
    ("per_prompt"; prompts without a Stage 2 set, or none of whose latents is an FM column, fall
    back to the global ranking), or the one global ranking for every prompt; only columns
    `rankable` marks (default all) are ranked. Also how many prompts got which."""
    need_global = mode == "global" or any(not sets.get(pid) for pid in prompt_ids)
    glob = rank_by_embedding_similarity(fm, columns, set(union), aggregate=aggregate,
                                        rankable=rankable)[:depth] if need_global else []
    if mode == "global":
        return {pid: glob for pid in prompt_ids}, {"own": 0, "global": len(prompt_ids)}
    own = rank_per_prompt(fm, columns, {pid: sets[pid] for pid in prompt_ids if sets.get(pid)}, depth, aggregate,
                          rankable)
    out = {pid: own.get(pid) or glob for pid in prompt_ids}
    n_own = sum(1 for pid in prompt_ids if own.get(pid))
    return out, {"own": n_own, "global": len(prompt_ids) - n_own}


def rankings_frame(rankings: dict[str, list]) -> pd.DataFrame:
    """One row per (prompt, rank): id, rank (0 = most similar), feature ("layer-index"), score."""
    rows = [(pid, r, f.id, s) for pid, ranked in rankings.items() for r, (f, s) in enumerate(ranked)]
    return pd.DataFrame(rows, columns=["id", "rank", "feature", "score"])


def stage3_task(ctx, items, p) -> list[dict]:
    """Stage 2 active latents + the top-K of the prompt's Stage 3 ranking: smallest jailbreaking K."""
    sc = ctx.cfg.stage3
    rankings = {pid: p["rankings"].get(pid, []) for pid, _ in items}
    res = stage3_search(ctx.model, ctx.saes, items, p["active2"], rankings, sc.ks, judge=ctx.judge,
                        rungs_per_round=sc.rungs_per_round, quiet=True, **generation_args(ctx))
    return [Stage3Record(r.id, r.k, r.tried, r.completions, r.verdicts,
                         FeatureSet(p["active2"].get(r.id, ()))).to_json() for r in res]


def probe_sweep_task(ctx, items, p) -> list[dict]:
    """FM vs probe: per prompt, jailbroken or not at every `stage3.probe_ks` K (sorted), for the
    probe's shared ranking and the prompt's own FM ranking."""
    sweep = stage3_sweep(ctx.model, ctx.saes, items, p["active2"], p["probe"],
                         {pid: p["fm"].get(pid, []) for pid, _ in items}, ctx.cfg.stage3.probe_ks, judge=ctx.judge,
                         **generation_args(ctx))
    return [{"id": pid, **{name: [bool(x) for x in v[i]] for name, v in sweep.jailbroken.items()}}
            for i, (pid, _) in enumerate(items)]


STAGE = Stage("stage3", "core", StageInputs(
    ("model.batch_size", "data.text_field", "judge", "generation", "stage3", "seed"),
    ("stage3.harmful", "stage3.harmless"), ("stage2",)),
    run_stage3, {"stage3": stage3_task, "probe_sweep": probe_sweep_task})
