"""Redundant ("hydra") latents: Stage 2 latents that are silent on a prompt yet needed for its
jailbreak (paper: Stage 3 sanity check; Analysis, "Redundant Features").

All functions take live objects and plain data (prompts as (id, text); sets as {id: FeatureSet};
activity as {id: Activity}) and return JSON-able dicts. Prompts are batched as rows, each with its
own intervention plan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from ..errors import UserError
from ..interventions.engine import intervene
from ..interventions.features import Feature, FeatureSet
from ..interventions.spec import Recording
from ..io.model import ChatModel
from ..measures.judges import Judge
from .activity import Prompts, lookup, prefix_lengths, region, require
from .evaluate import generate_judged, refusal_probs
from .records import Activity


def inactive_critical(model: ChatModel, saes, prompts: Prompts, sets: Mapping, activity: Mapping,
                      judge: Judge, max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """Jailbreak when ablating the full set, only its active part, only its inactive part (paper:
    dropping the inactive latents makes the jailbreak fail). A variant equal to the full set reuses
    its verdict; an empty variant is None (nothing to ablate). Prompts should be ones the model
    refuses unablated (the paper's filtered D_harmful): a non-refused prompt counts as jailbroken
    under any variant, including an inactive set whose ablation is a no-op."""
    lists = lookup(sets, prompts)
    require(activity, prompts, "activity")
    rows: list[tuple] = []
    records: list[dict] = []
    for (pid, text), full in zip(prompts, lists):
        act, ina = activity[pid].active, activity[pid].inactive
        variants = {"full": full, "active": act, "inactive": ina}
        rec = {"id": pid, "n_full": len(full), "n_active": len(act), "n_inactive": len(ina),
               "inactive": ina.ids(), "jailbroken": {}, "completions": {}, "decided_by": {}, "same_as_full": []}
        for name, feats in variants.items():
            if not feats:
                rec["jailbroken"][name] = rec["completions"][name] = None
            elif name != "full" and set(feats) == set(full):
                rec["same_as_full"].append(name)
            else:
                rows.append((len(records), name, text, feats))
        records.append(rec)
    j = generate_judged(model, saes, [t for *_, t, _ in rows], [f.plan() for *_, f in rows],
                        judge, max_new_tokens, batch_size)
    for (r, name, _, _), comp, jb, v in zip(rows, j.completions, j.jailbroken, j.verdicts()):
        records[r]["jailbroken"][name], records[r]["completions"][name] = bool(jb), comp
        records[r]["decided_by"][name] = v.judge
    for rec in records:
        for name in rec["same_as_full"]:
            rec["jailbroken"][name] = rec["jailbroken"]["full"]
            rec["completions"][name] = rec["completions"]["full"]
            rec["decided_by"][name] = rec["decided_by"].get("full")
    return {"counts": critical_counts(records), "records": records}


def critical_counts(records: Sequence[dict]) -> dict:
    """Counts over per-prompt `inactive_critical` records (any subset order)."""
    jb = lambda rec, k: rec["jailbroken"][k] is True  # noqa: E731
    return {
        "n_prompts": len(records),
        "n_with_inactive": sum(r["n_inactive"] > 0 for r in records),
        "n_inactive_latents": sum(r["n_inactive"] for r in records),
        "n_unique_inactive_latents": len({Feature.of(f) for r in records for f in r["inactive"]}),
        "jailbroken_full": sum(jb(r, "full") for r in records),
        "jailbroken_active_only": sum(jb(r, "active") for r in records),
        "jailbroken_inactive_only": sum(jb(r, "inactive") for r in records),
        "lost_without_inactive": sum(jb(r, "full") and not jb(r, "active") for r in records),
        "gained_without_inactive": sum(jb(r, "active") and not jb(r, "full") for r in records),
    }


def _rel(new: float, ref: float) -> float:
    return abs(new - ref) / ref if ref > 0 else (0.0 if new == ref else float("inf"))


def wake_up(model: ChatModel, saes, prompts: Prompts, activity: Mapping[str, Activity],
            batch_size: int = 16, tokenizer=None, threshold: float = 0.1, impact: str = "with_active",
            ids: Collection[str] | None = None) -> dict:
    """The paper's three steps. (1) Inactive latents per prompt come from `activity`. (2) Keep
    the prompts where ablating them has an impact (`redundant_prompts`), or the prompts `ids`
    (e.g. those whose jailbreak fails without the inactive set). (3) Ablate the active set and
    record where the inactive latents fire (`woken_latents`); `wake_summary` counts it up."""
    require(activity, prompts, "activity")
    with_inactive = [(pid, t) for pid, t in prompts if activity[pid].inactive]
    if ids is not None:
        wanted = set(ids)
        step2: dict = {}
        kept = [(pid, t) for pid, t in with_inactive if pid in wanted]
    else:
        kept, step2 = redundant_prompts(model, saes, with_inactive, activity, batch_size, threshold, impact)
    records = woken_latents(model, saes, kept, activity, batch_size, tokenizer)
    summary = wake_summary(records, len(prompts), len(with_inactive))
    summary.update(impact=impact if ids is None else "ids", threshold=threshold)
    return {"summary": summary, "step2": step2, "records": records}


def redundant_prompts(model: ChatModel, saes, prompts: Prompts, activity: Mapping[str, Activity],
                      batch_size: int, threshold: float, impact: str) -> tuple[list, dict]:
    """Step 2: the prompts where ablating the inactive set changes P("I") at the last prompt
    position by at least `threshold` (relative). impact="alone" (literal) measures P(base) →
    P(inactive ablated), which is 0 for every prompt since zero-ablating latents that are zero at
    every prompt token is an exact no-op; "with_active" measures the inactive set where it can
    act: P(active ablated) → P(active + inactive ablated). Returns (kept, per-prompt details)."""
    if impact not in ("with_active", "alone"):
        raise UserError(f"unknown impact {impact!r}: use with_active or alone")
    if not prompts:
        return [], {}
    plans = []
    for pid, _ in prompts:
        a, i = activity[pid].active, activity[pid].inactive
        plans += [[], i.plan(), a.plan(), (a | i).plan()]
    p = refusal_probs(model, saes, [t for _, t in prompts for _ in range(4)], plans, batch_size)
    details = {}
    for (pid, _), (base, alone, act, full) in zip(prompts, p.view(len(prompts), 4).tolist()):
        rel = _rel(alone, base) if impact == "alone" else _rel(full, act)
        details[pid] = {"p_base": base, "p_inactive_only": alone, "p_active_only": act,
                        "p_full": full, "impact": rel, "kept": rel >= threshold}
    return [(pid, t) for pid, t in prompts if details[pid]["kept"]], details


def woken_latents(model: ChatModel, saes, prompts: Prompts, activity: Mapping[str, Activity],
                  batch_size: int = 16, tokenizer=None) -> list[dict]:
    """Step 3: with each prompt's active set ablated, every prompt token at which one of its
    inactive latents fires: {position, token_id, token, region (REGIONS), value}, per woken
    latent, plus the prompt's layout (prefix length, token count)."""
    if not prompts:
        return []
    tok = tokenizer or model.tokenizer
    texts = [t for _, t in prompts]
    inactive = [activity[pid].inactive for pid, _ in prompts]
    rec = Recording(FeatureSet(f for s in inactive for f in s).by_layer())
    batch = model.encode(texts)
    with intervene(model, saes, rows=[activity[pid].active.plan() for pid, _ in prompts], record=rec):
        model.logits(batch, batch_size=batch_size)
    real = [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(len(prompts))]
    n_pre = prefix_lengths(model, texts, tok)
    col = {Feature(l, i): c for l, v in rec.features.items() for c, i in enumerate(v)}
    hits: dict[tuple[int, Feature], list[dict]] = {}
    for st in rec.prompt_activations():
        for layer, a in st["acts"].items():
            for b in range(a.shape[0]):
                r = st["row_offset"] + b
                for f in (f for f in inactive[r] if f.layer == layer):
                    on = (a[b, :, col[f]] > 0) & (st["token_index"][b] >= 0)
                    for t in on.nonzero().flatten().tolist():
                        pos, tid = int(st["token_index"][b, t]), real[r][int(st["token_index"][b, t])]
                        hits.setdefault((r, f), []).append(
                            {"position": pos, "token_id": tid, "token": tok.decode([tid]),
                             "region": region(pos, n_pre[r], len(real[r]), batch.n_post[r]),
                             "value": float(a[b, t, col[f]])})
    return [{"id": pid, "prefix_len": n_pre[r], "n_tokens": len(real[r]),
             "active": activity[pid].active.ids(), "inactive": inactive[r].ids(),
             "woken": [{"feature": str(f), "firings": sorted(hits[(r, f)], key=lambda h: h["position"])}
                       for f in inactive[r] if (r, f) in hits]}
            for r, (pid, _) in enumerate(prompts)]


def wake_summary(records: Sequence[dict], n_prompts: int, n_with_inactive: int) -> dict:
    """Shares over the woken latents of `woken_latents` records: how many woke at all, how many
    fire on a system token (BOS included; paper: 74%), how many of those on BOS (paper: 97%),
    and the firing regions and tokens."""
    woken = [w for r in records for w in r["woken"]]
    regions = [{h["region"] for h in w["firings"]} for w in woken]
    system = sum(bool(rs & {"bos", "system"}) for rs in regions)
    bos = sum("bos" in rs for rs in regions)
    fire = Counter(h["region"] for w in woken for h in w["firings"])
    tokens = Counter(h["token"] for w in woken for h in w["firings"])
    n_red = sum(len(r["inactive"]) for r in records)
    share = lambda a, b: a / b if b else None  # noqa: E731
    n_fire = sum(fire.values())
    return {
        "n_prompts": n_prompts, "n_with_inactive": n_with_inactive, "n_kept": len(records),
        "n_redundant": n_red, "n_woken": len(woken), "woken_share": share(len(woken), n_red),
        "system_share": share(system, len(woken)),  # woken latents firing on >= 1 system token
        "bos_share_of_system": share(bos, system),  # of those, firing on BOS
        "bos_share": share(bos, len(woken)), "elsewhere_share": share(len(woken) - system, len(woken)),
        "firing_shares": {k: share(fire[k], n_fire) for k in ("bos", "system", "instruction", "post_instruction")},
        "top_tokens": tokens.most_common(20),
    }
