"""Pipeline stage `stage3` (interaction discovery): the factorization machine over SAE
activations, the ranking of new latents by embedding similarity to the Stage 2 set, the ablation
sweep (paper Table 2), and the linear-probe comparison."""

from __future__ import annotations

import time

import pandas as pd
import torch

from ..methods.fm import embedding_collapse, rank_by_embedding_similarity, train_fm
from ..methods.fm_data import collect_sae_activations, fm_dataset
from ..methods.probe import rank_by_weight, train_probe
from ..methods.records import Stage3Record
from ..methods.stage3 import probe_sweep
from .backend import fan_out
from .pipeline import Context, stage_hash
from .resolve import load_prompt_set, take


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
        return ctx.store.status(name)["summary"]
    sc, gen, model, saes = ctx.cfg.stage3, ctx.cfg.generation, ctx.model, ctx.saes
    tf = ctx.cfg.data.text_field
    harmful, harmless = _texts(sc.harmful, sc.n_per_class, tf, ctx.cfg.seed), _texts(sc.harmless, sc.n_per_class, tf, ctx.cfg.seed)
    n = min(len(harmful), len(harmless))
    harmful, harmless = harmful[:n], harmless[:n]
    layers = fm_layers(ctx)
    sets = ctx.results.stage2_sets()
    s2_union = sorted({f for s in sets.values() for f in s})
    with ctx.store.stage(name, h) as st:
        t0 = time.perf_counter()
        ctx.log(f"stage 3: SAE activations of {n} harmful + {n} harmless prompts at layers "
                f"{layers[0]}..{layers[-1]} (last {sc.n_tokens} tokens)")
        acts = [collect_sae_activations(model, saes, ps, layers, sc.n_tokens, ctx.cfg.model.batch_size,
                                        ctx.quiet, sc.mode) for ps in (harmful, harmless)]
        for label, a in zip(("harmful", "harmless"), acts):
            a.save(st.file(f"acts_{label}.safetensors"))
        data = fm_dataset(acts[0], acts[1], ctx.cfg.seed)
        res = train_fm(data.train, data.val, data.test, k=sc.embedding_size, lr=sc.lr, epochs=sc.epochs,
                       batch_size=sc.batch_size, seed=ctx.cfg.seed, quiet=ctx.quiet)
        collapse = {sc.embedding_size: embedding_collapse(res.model, seed=ctx.cfg.seed)}
        for k in sc.collapse_sizes:
            extra = train_fm(data.train, data.val, None, k=k, lr=sc.lr, epochs=sc.epochs,
                             batch_size=sc.batch_size, seed=ctx.cfg.seed, quiet=True)
            collapse[k] = embedding_collapse(extra.model, seed=ctx.cfg.seed)
        st.tensors("fm.safetensors", {**{k: v for k, v in res.model.state_dict().items()},
                                      "columns": torch.tensor(data.columns), "scale": torch.from_numpy(res.scale)})
        ranked = rank_by_embedding_similarity(res.model, data.columns, set(s2_union), aggregate=sc.aggregate)
        top = ranked[: max(max(sc.ks), max(sc.probe_ks))]
        st.table("ranking.parquet", pd.DataFrame({"feature": [f.id for f, _ in top],
                                                  "similarity": [s for _, s in top]}))
        probe = train_probe(data.train, data.test, data.val, seed=ctx.cfg.seed)
        probe_ranked = rank_by_weight(probe, data.columns, exclude=set(s2_union))
        prompts = [(p.id, p.text) for p in ctx.results.kept_prompts()]
        active2 = ctx.results.active_stage2()
        ck = st.checkpoint("results", key="id")
        fan_out(ctx, "stage3", prompts, {"active2": active2, "top": top}, ck, "stage 3 (K ladder)")
        records = [Stage3Record.from_json(ck.records[pid]) for pid, _ in prompts]
        st.jsonl("results.jsonl", [r.to_json() for r in records])
        sweep = probe_sweep(model, saes, prompts, active2, probe_ranked, top, sc.probe_ks, judge=ctx.judge,
                            max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, quiet=ctx.quiet)
        vs = sweep.counts()
        st.table("probe_vs_fm.parquet", vs)
        found = [r.k for r in records if r.k is not None]
        st.summary = {
            "fm": {"train_acc": res.train_acc, "val_acc": res.val_acc, "test_acc": res.test_acc,
                   "best_epoch": res.best_epoch, "columns": len(data.columns), "rows": len(data.train)
                   + len(data.val) + len(data.test), "collapse": {str(k): round(v, 4) for k, v in collapse.items()}},
            "probe": {"train_acc": probe.train_acc, "test_acc": probe.test_acc},
            "table2": {"refused": len(prompts), "jailbroken": len(found),
                       "mean_k": round(sum(found) / max(1, len(found)), 1),
                       "unique_stage3_latents": len({f for r in records if r.k for f, _ in top[: r.k]}),
                       "k_histogram": {str(k): found.count(k) for k in sorted(set(found))}},
            "probe_vs_fm": vs.to_dict(orient="records"), "layers": layers,
            "seconds": round(time.perf_counter() - t0, 1)}
    t2 = st.summary["table2"]
    ctx.log(f"stage 3: FM test accuracy {res.test_acc:.3f}; {t2['jailbroken']} of {t2['refused']} "
            f"prompts jailbroken with Stage 2 + top-K Stage 3 latents")
    return st.summary
