"""What ablating one critical latent does to refusal, on the prompts it is critical for: P("I")
with the latent ablated alone, and (for a prompt's Stage 2 set) with the set ablated with and
without it, the leave-one-out view that shows what a dormant "hydra" latent adds once the others
are gone. Feeds the latent dashboards (`dashboards.py`)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from ..io.model import ChatModel
from .activity import Prompts, max_activations
from .evaluate import refusal_probs


def latent_effects(model: ChatModel, saes, prompts: Prompts, pairs: Mapping[str, Sequence],
                   sets: Mapping[str, FeatureSet], batch_size: int = 16) -> list[dict]:
    """Per prompt: P("I") plain, and for each latent of `pairs[id]` its largest activation on the
    plain prompt and P("I") with it ablated alone (an inactive latent's lone ablation is an exact
    no-op, so it is not run); for latents of the prompt's Stage 2 set (`sets[id]`), also P("I")
    with the set ablated and with the set minus the latent ablated (leave one out).

    All prompts' ablations share batches: one pass for the activations of every prompt, then every
    (prompt, ablation) row in `batch_size`-row passes (a per-row plan each, as Stage 2 does), so the
    cost grows with rows / batch_size, not with prompts or latents."""
    todo = [(pid, text, FeatureSet(pairs.get(pid, ())), FeatureSet(sets.get(pid, ()))) for pid, text in prompts]
    live = [t for t in todo if t[2]]
    if live:  # longest first: rows of prompts of like length share a pass (less padding)
        n = model.encode([t[1] for t in live]).lengths.tolist()
        live = [live[j] for j in sorted(range(len(live)), key=lambda j: -n[j])]
    acts = max_activations(model, saes, [t[1] for t in live], [f for t in live for f in t[2]],
                           batch_size=batch_size)
    texts: list[str] = []
    plans: list[list] = []
    keys: list[tuple[str, str, Feature | None]] = []
    for (pid, text, feats, s2), act in zip(live, acts):
        rows: list[tuple[tuple[str, Feature | None], list]] = [(("base", None), [])]
        if s2:
            rows.append((("set", None), s2.plan()))
        for f in feats:
            if act[f] > 0:
                rows.append((("alone", f), FeatureSet([f]).plan()))
            if f in s2 and len(s2) > 1:
                rows.append((("loo", f), (s2 - [f]).plan()))
        for (kind, of), plan in rows:
            texts.append(text)
            plans.append(plan)
            keys.append((pid, kind, of))
    p = refusal_probs(model, saes, texts, plans, batch_size).tolist() if texts else []
    got = dict(zip(keys, p))
    out: list[dict] = []
    act_of = {t[0]: a for t, a in zip(live, acts)}
    for pid, _, feats, s2 in todo:
        if not feats:
            out.append({"id": pid, "p_base": None, "p_set": None, "effects": []})
            continue
        act = act_of[pid]
        base, pset = got[(pid, "base", None)], got.get((pid, "set", None))
        effects = []
        for f in feats:
            alone = got.get((pid, "alone", f), base)
            e = {"feature": f.id, "activation": round(act[f], 4), "active": act[f] > 0,
                 "in_stage2": f in s2, "p_alone": alone, "delta_alone": alone - base}
            if f in s2 and pset is not None:
                loo = got.get((pid, "loo", f), base)  # a one-latent set without it is the plain prompt
                e.update(p_without=loo, delta_loo=pset - loo)
            effects.append(e)
        out.append({"id": pid, "p_base": base, "p_set": pset, "effects": effects})
    return out


def effect_pairs(critical: Mapping[str, Iterable], cap: int | None, seed: int) -> dict[str, list[str]]:
    """{prompt: latents} to measure, at most `cap` prompts per latent (a seeded draw), from
    {prompt: latents it is critical for}."""
    if cap is not None and cap < 1:
        raise UserError(f"dashboards.effect_prompts must be at least 1, got {cap}")
    prompts_of: dict[Feature, list[str]] = {}
    for pid in sorted(critical):
        for f in FeatureSet(critical[pid]):
            prompts_of.setdefault(f, []).append(pid)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    for f in sorted(prompts_of):
        ps = prompts_of[f]
        chosen = ps if cap is None or len(ps) <= cap else sorted(rng.sample(ps, cap))
        for pid in chosen:
            out.setdefault(pid, []).append(f.id)
    return out


def effects_by_latent(records: Iterable[dict], stage_of: Mapping[str, Mapping[str, str]]) -> dict[str, list[dict]]:
    """Regroup per-prompt `latent_effects` records by latent; `stage_of[prompt][latent]` says
    which stage's set made it critical there ("2" or "3")."""
    out: dict[str, list[dict]] = {}
    for r in records:
        for e in r["effects"]:
            out.setdefault(e["feature"], []).append(
                {"prompt": r["id"], "stage": stage_of.get(r["id"], {}).get(e["feature"]), "p_base": r["p_base"],
                 "p_set": r["p_set"], **{k: v for k, v in e.items() if k != "feature"}})
    return out
