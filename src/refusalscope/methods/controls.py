"""Controls for the jailbreak-critical sets (paper Analysis): equally many random active latents,
the O'Brien et al. "active on ≥ k tokens" baseline (Figure 6), and Stage 3 latents alone (their
causal link to the Stage 2 latents). Prompts are batched as rows with per-row plans.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from statistics import mean

import numpy as np

from ..interventions.features import Feature, FeatureSet
from ..interventions.spec import FeatureAblation
from ..io.model import ChatModel
from ..measures.judges import Judge
from .activity import Prompts, lookup, max_activations, token_counts
from .evaluate import generate_judged


def random_sets(sets: Mapping, active: Mapping, seed: int) -> dict[str, dict]:
    """Per prompt, latents drawn from `active[id]` ({layer: [latents active on the prompt]}),
    excluding the prompt's own set, with the set's per-layer counts. Seeded by (seed, id), so a
    prompt's draw does not depend on the other prompts. `short`: a layer had too few candidates.
    The own set is grouped by layer once per prompt (not scanned once per layer)."""
    out = {}
    for pid, own in sets.items():
        mine = FeatureSet(own).by_layer()
        rng = random.Random(f"{seed}/{pid}")
        picked, short = [], False
        for layer, ids in mine.items():
            pool = sorted(set(map(int, active[pid].get(layer, ()))).difference(ids))
            k = min(len(ids), len(pool))
            short |= k < len(ids)
            picked += [Feature(layer, i) for i in sorted(rng.sample(pool, k))]
        out[pid] = {"features": FeatureSet(picked), "short": short}
    return out


def random_control(model: ChatModel, saes, prompts: Prompts, sets: Mapping, judge: Judge,
                   seeds: Sequence[int] = (0, 1, 2), max_new_tokens: int = 64,
                   batch_size: int = 16) -> dict:
    """Ablate as many random *active* latents as each prompt's critical set (same layer mix), for
    each seed; jailbreaks per seed (paper: 0 on LLaMA, 5 on Gemma)."""
    lists = dict(zip([pid for pid, _ in prompts], lookup(sets, prompts)))
    layers = sorted({l for s in lists.values() for l, _ in s})
    counts = token_counts(model, saes, [t for _, t in prompts], layers, batch_size)
    active = {pid: {l: list(c) for l, c in cnt.items()} for (pid, _), cnt in zip(prompts, counts)}
    draws = {seed: random_sets(lists, active, seed) for seed in seeds}
    rows = [(seed, pid, text) for seed in seeds for pid, text in prompts]
    j = generate_judged(model, saes, [t for *_, t in rows],
                        [draws[s][pid]["features"].plan() for s, pid, _ in rows],
                        judge, max_new_tokens, batch_size)
    records = [{"seed": s, "id": pid, "features": draws[s][pid]["features"].ids(),
                "short": draws[s][pid]["short"], "jailbroken": bool(jb), "completion": c, "decided_by": v.judge}
               for (s, pid, _), jb, c, v in zip(rows, j.jailbroken, j.completions, j.verdicts())]
    return {**random_summary(records, seeds, len(prompts)), "records": records}


def random_summary(records: Sequence[dict], seeds: Sequence[int], n_prompts: int) -> dict:
    """Jailbreaks per seed from the per-(seed, prompt) records (any subset order)."""
    per_seed = []
    for seed in seeds:
        n = sum(r["jailbroken"] for r in records if r["seed"] == seed)
        per_seed.append({"seed": seed, "jailbroken": n, "n_prompts": n_prompts,
                         "asr": n / n_prompts if n_prompts else None})
    return {"per_seed": per_seed, "mean_jailbroken": mean(p["jailbroken"] for p in per_seed)
            if per_seed else None}


def obrien_baseline(model: ChatModel, saes, prompts: Prompts, judge: Judge,
                    ks: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10), max_new_tokens: int = 64,
                    batch_size: int = 16, layers: Sequence[int] | None = None) -> dict:
    """O'Brien et al.'s selection (without their clamp search): per prompt, every latent of the
    given SAE layers active on ≥ k prompt tokens, ablated → ASR per k (paper Figure 6).
    The counts stay sparse ({layer: {latent: tokens}}) and each row's plan is built from them
    directly: at k = 1 a row ablates tens of thousands of latents at the paper's width."""
    counts = token_counts(model, saes, [t for _, t in prompts], layers, batch_size)
    arrays = [{l: (np.fromiter(c.keys(), np.int64, len(c)), np.fromiter(c.values(), np.int64, len(c)))
               for l, c in sorted(cnt.items()) if c} for cnt in counts]
    rows = []
    for k in ks:
        for (pid, text), arr in zip(prompts, arrays):
            table = {l: tuple(np.sort(idx[n >= k]).tolist()) for l, (idx, n) in arr.items()}
            ablation = FeatureAblation(table)
            rows.append((k, pid, text, ablation))
    j = generate_judged(model, saes, [r[2] for r in rows], [[a] if a.size else [] for *_, a in rows],
                        judge, max_new_tokens, batch_size)
    records = [{"k": k, "id": pid, "size": a.size, "jailbroken": bool(jb), "completion": c, "decided_by": v.judge}
               for (k, pid, _, a), jb, c, v in zip(rows, j.jailbroken, j.completions, j.verdicts())]
    return {"per_k": obrien_summary(records, ks), "records": records}


def obrien_summary(records: Sequence[dict], ks: Sequence[int]) -> list[dict]:
    per_k = []
    for k in ks:
        rs = [r for r in records if r["k"] == k]
        n = sum(r["jailbroken"] for r in rs)
        per_k.append({"k": k, "jailbroken": n, "asr": n / len(rs) if rs else None,
                      "mean_set_size": mean(r["size"] for r in rs) if rs else None})
    return per_k


def stage3_only(model: ChatModel, saes, prompts: Prompts, stage3_sets: Mapping,
                active_stage2: Mapping, judge: Judge, max_new_tokens: int = 64,
                batch_size: int = 16) -> dict:
    """Ablate only each prompt's Stage 3 latents: jailbreaks, and (one forward of base + ablated
    rows, Recording) the share of its active Stage 2 latents switched off and the relative drop
    (base − ablated) / base of those still on. "Activation" = max over prompt tokens; a Stage 2
    latent that is no longer active without ablation is left out. Paper (LLaMA): 12% mean / 44%
    max deactivated, 81% drop (pooled over still-active latents here)."""
    s3 = lookup(stage3_sets, prompts, "stage3_sets")
    s2 = lookup(active_stage2, prompts, "active_stage2")
    texts = [t for _, t in prompts]
    plans = [s.plan() for s in s3]
    j = generate_judged(model, saes, texts, plans, judge, max_new_tokens, batch_size)
    n = len(prompts)
    mx = max_activations(model, saes, texts + texts, [f for s in s2 for f in s],
                         [[] for _ in texts] + plans, batch_size)
    records, by = [], [v.judge for v in j.verdicts()]
    for r, (pid, _) in enumerate(prompts):
        base, abl = mx[r], mx[n + r]
        on = [f for f in s2[r] if base[f] > 0]
        off = FeatureSet(f for f in on if abl[f] <= 0)
        d = [(base[f] - abl[f]) / base[f] for f in on if abl[f] > 0]
        records.append({"id": pid, "jailbroken": bool(j.jailbroken[r]), "completion": j.completions[r],
                        "decided_by": by[r],
                        "n_stage3": len(s3[r]), "n_active_stage2": len(on), "deactivated": off.ids(),
                        "deactivated_share": len(off) / len(on) if on else None,
                        "mean_drop": mean(d) if d else None, "drops": d})
    return {"summary": stage3_only_summary(records), "records": records}


def stage3_only_summary(records: Sequence[dict]) -> dict:
    """Jailbreaks, deactivated shares and the pooled drop of still-active latents."""
    shares = [r["deactivated_share"] for r in records if r["deactivated_share"] is not None]
    drops = [x for r in records for x in r["drops"]]
    return {"n_prompts": len(records), "jailbroken": sum(r["jailbroken"] for r in records),
               "deactivated_mean": mean(shares) if shares else None,
               "deactivated_max": max(shares) if shares else None,
               "drop_mean": mean(drops) if drops else None,
               "n_still_active": len(drops)}
