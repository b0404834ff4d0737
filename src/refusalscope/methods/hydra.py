"""Redundant ("hydra") latents: Stage 2 latents that are silent on a prompt yet needed for its
jailbreak (paper: Stage 3 sanity check; Analysis, "Redundant Features").

All functions take live objects and plain data (prompts as (id, text); a feature is (layer, index);
sets as {id: [feature, ...]}) and return JSON-able dicts. Prompts are batched as rows, each with its
own intervention plan.
"""

from __future__ import annotations

from collections import Counter
from typing import Collection, Iterable, Mapping, Sequence

from ..errors import UserError
from ..interventions.engine import intervene
from ..interventions.spec import FeatureAblation, Recording
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged, refusal_probs

Feature = tuple[int, int]
Prompts = Sequence[tuple[str, str]]


# ----------------------------------------------------------------- small shared helpers
def features(items: Iterable) -> list[Feature]:
    """(layer, index) tuples, duplicates dropped, order kept (accepts lists from JSON)."""
    return list(dict.fromkeys((int(l), int(i)) for l, i in items))


def by_layer(items: Iterable) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, i in features(items):
        out.setdefault(l, []).append(i)
    return {l: sorted(v) for l, v in sorted(out.items())}


def ablation(items: Iterable, positions="all") -> list:
    """The row plan that zero-ablates `items` ([] for an empty set: the unablated model)."""
    feats = features(items)
    return [FeatureAblation.from_ids(feats, positions)] if feats else []


def require(table: Mapping, prompts: Prompts, what: str) -> None:
    missing = [pid for pid, _ in prompts if pid not in table]
    if missing:
        raise UserError(f"{what} has no entry for prompt ids {missing[:5]}: pass one per prompt")


def lookup(sets: Mapping, prompts: Prompts, what: str = "sets") -> list[list[Feature]]:
    require(sets, prompts, what)
    return [features(sets[pid]) for pid, _ in prompts]


def max_activations(model: ChatModel, saes, texts: Sequence[str], feats: Iterable,
                    plans=None, batch_size: int = 16) -> list[dict[Feature, float]]:
    """Per text, the largest activation of each latent over its prompt tokens (Recording), under
    optional per-row plans. Recording reads each layer before that layer's own ablation."""
    table = by_layer(feats)
    if not table or not texts:
        return [{} for _ in texts]
    rec = Recording(table)
    with intervene(model, saes, rows=plans, record=rec):
        model.logits(model.encode(list(texts)), batch_size=batch_size)
    mx = rec.max_activation(len(texts))
    return [{(l, i): float(mx[l][r, c]) for l, ids in table.items() for c, i in enumerate(ids)}
            for r in range(len(texts))]


def prefix_lengths(model: ChatModel, instructions: Sequence[str], tokenizer=None) -> list[int]:
    """Tokens before the user instruction in each chat-formatted prompt (BOS, system block, user
    header): the paper's "system tokens". Same formatting and tokenization as `model.encode`."""
    tok = tokenizer or model.tokenizer
    out = []
    for ins in instructions:
        text = model.format_chat(ins)
        start = text.rfind(ins) if ins and ins in text else len(text)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        out.append(sum(1 for s, _ in enc["offset_mapping"] if s < start))
    return out


# ----------------------------------------------------------------- analyses
def activity(model: ChatModel, saes, prompts: Prompts, sets: Mapping, batch_size: int = 16) -> dict:
    """{id: {"active": [...], "inactive": [...]}}: a latent of the prompt's set is inactive if its
    activation is zero at every prompt token of the unablated model."""
    lists = lookup(sets, prompts)
    mx = max_activations(model, saes, [t for _, t in prompts],
                         [f for s in lists for f in s], batch_size=batch_size)
    return {pid: {"active": [f for f in s if m[f] > 0], "inactive": [f for f in s if m[f] <= 0]}
            for (pid, _), s, m in zip(prompts, lists, mx)}


def inactive_critical(model: ChatModel, saes, prompts: Prompts, sets: Mapping, activity: Mapping,
                      judge: Judge, max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """Jailbreak when ablating the full set, only its active part, only its inactive part (paper:
    dropping the inactive latents makes the jailbreak fail). A variant equal to the full set reuses
    its verdict; an empty variant is None (nothing to ablate). Prompts should be ones the model
    refuses unablated (the paper's filtered D_harmful): a non-refused prompt counts as jailbroken
    under any variant, including an inactive set whose ablation is a no-op."""
    lists = lookup(sets, prompts)
    require(activity, prompts, "activity")
    rows, records = [], []
    for (pid, text), full in zip(prompts, lists):
        act, ina = features(activity[pid]["active"]), features(activity[pid]["inactive"])
        variants = {"full": full, "active": act, "inactive": ina}
        rec = {"id": pid, "n_full": len(full), "n_active": len(act), "n_inactive": len(ina),
               "inactive": ina, "jailbroken": {}, "completions": {}, "same_as_full": []}
        for name, feats in variants.items():
            if not feats:
                rec["jailbroken"][name] = rec["completions"][name] = None
            elif name != "full" and set(feats) == set(full):
                rec["same_as_full"].append(name)
            else:
                rows.append((len(records), name, text, feats))
        records.append(rec)
    j = generate_judged(model, saes, [t for *_, t, _ in rows], [ablation(f) for *_, f in rows],
                        judge, max_new_tokens, batch_size)
    for (r, name, _, _), comp, jb in zip(rows, j.completions, j.jailbroken):
        records[r]["jailbroken"][name], records[r]["completions"][name] = bool(jb), comp
    for rec in records:
        for name in rec["same_as_full"]:
            rec["jailbroken"][name] = rec["jailbroken"]["full"]
            rec["completions"][name] = rec["completions"]["full"]
    return {"counts": critical_counts(records), "records": records}


def critical_counts(records: Sequence[dict]) -> dict:
    """Counts over per-prompt `inactive_critical` records (any subset order)."""
    jb = lambda rec, k: rec["jailbroken"][k] is True  # noqa: E731
    return {
        "n_prompts": len(records),
        "n_with_inactive": sum(r["n_inactive"] > 0 for r in records),
        "n_inactive_latents": sum(r["n_inactive"] for r in records),
        "n_unique_inactive_latents": len({tuple(f) for r in records for f in r["inactive"]}),
        "jailbroken_full": sum(jb(r, "full") for r in records),
        "jailbroken_active_only": sum(jb(r, "active") for r in records),
        "jailbroken_inactive_only": sum(jb(r, "inactive") for r in records),
        "lost_without_inactive": sum(jb(r, "full") and not jb(r, "active") for r in records),
        "gained_without_inactive": sum(jb(r, "active") and not jb(r, "full") for r in records),
    }


def _rel(new: float, ref: float) -> float:
    return abs(new - ref) / ref if ref > 0 else (0.0 if new == ref else float("inf"))


def wake_up(model: ChatModel, saes, prompts: Prompts, activity: Mapping, batch_size: int = 16,
            tokenizer=None, threshold: float = 0.1, impact: str = "with_active",
            ids: Collection[str] | None = None) -> dict:
    """The paper's three steps. (1) inactive latents per prompt come from `activity`. (2) Keep the
    prompts where ablating the inactive set has an impact: relative change of P("I") at the last
    prompt position (refusal_probs) ≥ `threshold`. With impact="alone" (literal) the change is
    P(base) → P(inactive ablated); zero-ablating latents that are zero at every prompt token is an
    exact no-op, so this is 0 for every prompt. impact="with_active" (default) measures the
    inactive set where it can act: P(active ablated) → P(active + inactive ablated). `ids`
    overrides step 2 (e.g. prompts whose jailbreak fails without the inactive set).
    (3) Ablate the active set and record the inactive latents at every prompt token."""
    if impact not in ("with_active", "alone"):
        raise UserError(f"unknown impact {impact!r}: use with_active or alone")
    tok = tokenizer or model.tokenizer
    require(activity, prompts, "activity")
    act = {pid: features(activity[pid]["active"]) for pid, _ in prompts}
    ina = {pid: features(activity[pid]["inactive"]) for pid, _ in prompts}
    cand = [(pid, t) for pid, t in prompts if ina[pid]]
    step2: dict[str, dict] = {}
    if ids is not None:
        wanted = set(ids)
        kept = [(pid, t) for pid, t in cand if pid in wanted]
    elif cand:
        plans = [p for pid, _ in cand for p in
                 ([], ablation(ina[pid]), ablation(act[pid]), ablation(act[pid] + ina[pid]))]
        p = refusal_probs(model, saes, [t for _, t in cand for _ in range(4)], plans, batch_size)
        p = p.view(len(cand), 4).tolist()
        for (pid, _), (base, alone, a, full) in zip(cand, p):
            rel = _rel(alone, base) if impact == "alone" else _rel(full, a)
            step2[pid] = {"p_base": base, "p_inactive_only": alone, "p_active_only": a,
                          "p_full": full, "impact": rel, "kept": rel >= threshold}
        kept = [(pid, t) for pid, t in cand if step2[pid]["kept"]]
    else:
        kept = []
    records, fire = [], Counter()
    woken = system = bos = 0
    tokens: Counter = Counter()
    if kept:
        texts = [t for _, t in kept]
        rec = Recording(by_layer(f for pid, _ in kept for f in ina[pid]))
        batch = model.encode(texts)
        with intervene(model, saes, rows=[ablation(act[pid]) for pid, _ in kept], record=rec):
            model.logits(batch, batch_size=batch_size)
        real = [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(len(kept))]
        n_pre = prefix_lengths(model, texts, tok)
        col = {(l, i): c for l, v in rec.features.items() for c, i in enumerate(v)}
        hits: dict[tuple[int, Feature], list[dict]] = {}
        for st in rec.prompt_activations():
            ti = st["token_index"]
            for layer, a in st["acts"].items():
                for b in range(a.shape[0]):
                    r = st["row_offset"] + b
                    for f in (f for f in ina[kept[r][0]] if f[0] == layer):
                        for t in ((a[b, :, col[f]] > 0) & (ti[b] >= 0)).nonzero().flatten().tolist():
                            pos = int(ti[b, t])
                            region = ("bos" if pos == 0 else "system" if pos < n_pre[r] else
                                      "instruction" if pos < len(real[r]) - batch.n_post[r]
                                      else "post_instruction")
                            tid = real[r][pos]
                            hits.setdefault((r, f), []).append(
                                {"position": pos, "token_id": tid, "token": tok.decode([tid]),
                                 "region": region, "value": float(a[b, t, col[f]])})
        for r, (pid, _) in enumerate(kept):
            woke = []
            for f in ina[pid]:
                fs = sorted(hits.get((r, f), []), key=lambda h: h["position"])
                if not fs:
                    continue
                regions = {h["region"] for h in fs}
                woken += 1
                system += bool(regions & {"bos", "system"})
                bos += "bos" in regions
                fire.update(h["region"] for h in fs)
                tokens.update(h["token"] for h in fs)
                woke.append({"feature": f, "firings": fs})
            records.append({"id": pid, "prefix_len": n_pre[r], "n_tokens": len(real[r]),
                            "active": act[pid], "inactive": ina[pid], "woken": woke})
    n_red = sum(len(ina[pid]) for pid, _ in kept)
    share = lambda a, b: a / b if b else None  # noqa: E731
    n_fire = sum(fire.values())
    summary = {
        "impact": impact if ids is None else "ids", "threshold": threshold,
        "n_prompts": len(prompts), "n_with_inactive": len(cand), "n_kept": len(kept),
        "n_redundant": n_red, "n_woken": woken, "woken_share": share(woken, n_red),
        "system_share": share(system, woken),  # woken latents firing on ≥1 system token (BOS incl.)
        "bos_share_of_system": share(bos, system),  # of those, firing on BOS (paper: 97%)
        "bos_share": share(bos, woken), "elsewhere_share": share(woken - system, woken),
        "firing_shares": {k: share(fire[k], n_fire) for k in
                          ("bos", "system", "instruction", "post_instruction")},
        "top_tokens": tokens.most_common(20),
    }
    return {"summary": summary, "step2": step2, "records": records}
