"""Pipeline stage `direction`: derive r̂(l*), evaluate it on the test split, plot diagnostics."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..interventions.spec import ActAdd, DirectionAblation
from ..methods.direction import candidate_layers, cosine_profile, mean_differences, score_candidates, select_direction
from ..methods.evaluate import generate_judged
from . import plots
from .pipeline import Context, stage_hash
from .resolve import load_prompt_set, take
from .stage_spec import Stage, StageInputs
from .store import atomic_write_tensors, read_tensors


def refused_train_prompts(ctx: Context, st, prompts: list[str]) -> list[str]:
    """The harmful train prompts the judge calls refused (paper: r is the difference between
    prompts that elicit refusal and benign ones). Verdicts are checkpointed per prompt."""
    gen = ctx.cfg.generation
    ck = st.checkpoint("train_refused", key="key")
    items = list(enumerate(prompts))
    # chunks are cut from all prompts, so a resumed run pads each prompt as an uninterrupted one does
    chunks = [items[s:s + gen.batch_size] for s in range(0, len(items), gen.batch_size)]
    for chunk in [c for c in chunks if any(f"{i}" not in ck for i, _ in c)]:
        j = generate_judged(ctx.model, None, [t for _, t in chunk], None, ctx.judge, gen.max_new_tokens,
                            gen.batch_size, quiet=ctx.quiet, desc="judge harmful train prompts")
        for (i, _), rec in zip(chunk, j.records([t for _, t in chunk])):
            ck.add({"key": f"{i}", **rec})
    kept = [t for i, t in enumerate(prompts) if ck.records[f"{i}"]["refused"]]
    st.jsonl("train_refused.jsonl", [ck.records[f"{i}"] for i in range(len(prompts))])
    if len(kept) < 2:
        raise UserError(f"only {len(kept)} of {len(prompts)} harmful train prompts are refused by judge "
                        f"{ctx.judge.name}: pass more harmful train prompts, or set direction.refused_only: false")
    ctx.log(f"direction: {len(kept)} of {len(prompts)} harmful train prompts refused (kept for the mean)")
    return kept


def run_direction(ctx: Context) -> dict:
    name = "direction"
    h = stage_hash(ctx, name)
    if ctx.store.is_done(name, h):
        return ctx.store.recorded(name)["summary"]
    cfg, dc = ctx.cfg, ctx.cfg.direction
    tf = cfg.data.text_field
    harm_tr = take([p.text for p in load_prompt_set(cfg.data.harmful_train, tf)], dc.n_train, cfg.seed)
    safe_tr = take([p.text for p in load_prompt_set(cfg.data.harmless_train, tf)], dc.n_train, cfg.seed)
    harm_val = take([p.text for p in load_prompt_set(cfg.data.harmful_val, tf)], dc.n_val, cfg.seed)
    safe_val = take([p.text for p in load_prompt_set(cfg.data.harmless_val, tf)], dc.n_val, cfg.seed)
    kept = ctx.results.kept_prompts()
    n_eval = cfg.data.max_prompts or len(kept)
    safe_test = take([p.text for p in load_prompt_set(cfg.data.harmless_test, tf)], n_eval, cfg.seed)
    model, bs = ctx.model, cfg.model.batch_size
    judge = ctx.judge
    gen = cfg.generation
    with ctx.store.stage(name, h) as st:
        partial = ctx.store.path(name, "diffs.partial.safetensors")
        n_train_in = len(harm_tr)
        if dc.refused_only:
            harm_tr = refused_train_prompts(ctx, st, harm_tr)
        if partial.exists():  # resumed: the mean differences were computed before
            diffs = read_tensors(partial)["diffs"]
        else:
            ctx.log(f"direction: mean differences over {len(harm_tr)} harmful / {len(safe_tr)} harmless prompts")
            diffs = mean_differences(model, harm_tr, safe_tr, dc.positions, bs, ctx.quiet)
            atomic_write_tensors(partial, {"diffs": diffs})
        layers = candidate_layers(model.n_layers, dc.layers)
        ck = st.checkpoint("candidates", key="key")
        done = {(r["position"], r["layer"]): {k: v for k, v in r.items() if k != "key"}
                for r in ck.records.values()}
        table = score_candidates(model, diffs, dc.positions, layers, harm_val, safe_val, bs, ctx.quiet,
                                 done, lambda row: ck.add({"key": f"{row['position']}:{row['layer']}", **row}))
        choice = select_direction(model, diffs, dc.positions, table, harm_val, safe_val, judge,
                                  dc.max_kl, dc.n_generate, gen.max_new_tokens, gen.batch_size, ctx.quiet)
        st.tensors("direction.safetensors", {"direction": choice.direction, "vector": choice.vector,
                                             "diffs": diffs},
                   metadata={"layer": choice.layer, "position": choice.position, "positions": dc.positions})
        st.table("candidates.parquet", choice.table)
        plots.direction_candidates(choice.table, st.file("candidates.png"))
        texts = [p.text for p in kept][:n_eval]
        ctx.log(f"direction: l* = {choice.layer}; evaluating on {len(texts)} refused test prompts")
        abl = generate_judged(model, None, texts, None, judge, gen.max_new_tokens, gen.batch_size,
                              shared=[DirectionAblation(choice.direction)], quiet=ctx.quiet, desc="ablate r̂")
        refusal = ctx.refusal_judge  # refusal on harmless prompts (a harm classifier says "no" to every benign reply)
        # a cascade's first pass reads openings only: generate no more than it reads
        n_refusal = (
            (cfg.judge.first_pass_tokens or gen.max_new_tokens)
            if refusal is not judge and cfg.judge.first_pass
            else gen.max_new_tokens
        )
        add = generate_judged(model, None, safe_test, None, refusal, n_refusal, gen.batch_size,
                              shared=[ActAdd(choice.vector, choice.layer)], quiet=ctx.quiet, desc="ActAdd r")
        plain_safe = generate_judged(model, None, safe_test, None, refusal, n_refusal,
                                     gen.batch_size, quiet=ctx.quiet, desc="harmless plain")
        g = torch.Generator().manual_seed(cfg.seed)
        controls = []
        for _ in range(dc.random_controls):
            rnd = torch.randn(model.d_model, generator=g)
            j = generate_judged(model, None, texts, None, judge, gen.max_new_tokens, gen.batch_size,
                                shared=[DirectionAblation(rnd)], quiet=ctx.quiet, desc="random direction")
            controls.append(sum(j.jailbroken) / max(1, len(j)))
        filt = ctx.store.recorded("filter")["summary"]
        summary = {
            "layer": choice.layer, "position": choice.position,
            "asr_before_all_test": round(1 - filt["n_kept"] / max(1, filt["n_in"]), 4),
            "asr_after_ablation": round(sum(abl.jailbroken) / max(1, len(abl)), 4),
            "degenerate_after_ablation": round(sum(abl.degenerate) / max(1, len(abl)), 4),
            "refusal_harmless_plain": round(sum(plain_safe.refused) / max(1, len(plain_safe)), 4),
            "refusal_harmless_actadd": round(sum(add.refused) / max(1, len(add)), 4),
            "asr_random_direction": [round(c, 4) for c in controls],
            "n_eval_harmful": len(texts), "n_eval_harmless": len(safe_test),
            "n_train_harmful": len(harm_tr), "n_train_harmful_given": n_train_in,
            "n_train_harmless": len(safe_tr), "harmless_refusal_judge": refusal.name}
        st.jsonl("completions.jsonl",
                 [{"set": "ablate", "prompt": p, "completion": c, "jailbroken": jb}
                  for p, c, jb in zip(texts, abl.completions, abl.jailbroken)]
                 + [{"set": "actadd", "prompt": p, "completion": c, "refused": r}
                    for p, c, r in zip(safe_test, add.completions, add.refused)])
        cos_h = cosine_profile(model, harm_val, choice.direction, bs)
        cos_s = cosine_profile(model, safe_val, choice.direction, bs)
        st.tensors("cosine.safetensors", {"harmful": cos_h, "harmless": cos_s})
        plots.cosine_profile(cos_h.mean(0).tolist(), cos_s.mean(0).tolist(), cos_h[0].tolist(),
                             cos_s[0].tolist(), choice.layer, (harm_val[0], safe_val[0]),
                             st.file("cosine.png"))
        summary["cosine_at_lstar"] = {"harmful": round(cos_h[:, choice.layer].mean().item(), 4),
                                      "harmless": round(cos_s[:, choice.layer].mean().item(), 4)}
        st.summary = summary
    ctx.log(f"direction: ablating r̂({choice.layer}) jailbreaks {summary['asr_after_ablation']:.0%} of "
            f"refused prompts; ActAdd makes {summary['refusal_harmless_actadd']:.0%} of harmless prompts refuse")
    return summary


STAGE = Stage("direction", "core", StageInputs(
    ("model", "data", "judge", "generation", "direction", "seed"),
    ("data.harmful_train", "data.harmful_val", "data.harmless_train", "data.harmless_val", "data.harmless_test"),
    ("filter",)), run_direction)
