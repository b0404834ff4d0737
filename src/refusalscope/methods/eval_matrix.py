"""What the critical latents do beyond the prompt they were found on. Interventions built from a
run's sets (a shared core of the latents most often critical, per-category cores, unions, random
active latents matched in count and layer mix, woken latents clamped at BOS) sit next to the
refusal direction (ablated, or added with ActAdd); each is evaluated on held-out harmful prompts,
harmless and over-refusal prompts, and general text. Every cell is aggregated from per-prompt
rows, so it does not depend on how the rows were batched or which worker ran them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import mean

import torch

from ..interventions.engine import intervene
from ..interventions.features import Feature, FeatureSet
from ..interventions.spec import ActAdd, DirectionAblation, Intervention
from ..io.model import ChatModel
from ..io.prompts import Prompt
from ..measures.judges import Judge, is_degenerate
from .activity import token_counts
from .controls import random_sets
from .evaluate import Judged, kl_divergence


@dataclass(frozen=True)
class EvalIntervention:
    """One row of the matrix. `same_as`: the row whose results it shares (identical latents)."""

    name: str
    kind: str
    features: FeatureSet = field(default_factory=FeatureSet)
    clamp: float | None = None
    seed: int | None = None
    category: str | None = None
    matched: str | None = None
    short: bool = False
    same_as: str | None = None

    @property
    def size(self) -> int:
        return len(self.features)

    def plan(self, direction: torch.Tensor, vector: torch.Tensor, layer: int,
             positions: str = "all") -> list[Intervention]:
        """The engine's interventions, shared by every row of a batch."""
        if self.kind == "none":
            return []
        if self.kind == "direction":
            return [DirectionAblation(direction)]
        if self.kind == "actadd":
            return [ActAdd(vector, layer)]
        if self.kind == "bos_clamp":
            assert self.clamp is not None  # a bos_clamp setting carries its clamp value
            return [self.features.clamp(self.clamp, positions=(0,))]
        return self.features.plan(positions)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "size": self.size, "features": self.features.ids(),
                "layers": {str(l): len(ids) for l, ids in self.features.by_layer().items()},
                "clamp": self.clamp, "seed": self.seed, "category": self.category, "matched": self.matched,
                "short": self.short, "same_as": self.same_as}


# ----------------------------------------------------------------- latent sets
def critical_counts(sets: Mapping[str, Iterable]) -> Counter:
    """In how many prompts' sets each latent is."""
    return Counter(f for s in sets.values() for f in FeatureSet(s))


def core_set(sets: Mapping[str, Iterable], n: int) -> FeatureSet:
    """The n latents most often critical (ties broken by layer, then index)."""
    ranked = sorted(critical_counts(sets).items(), key=lambda kv: (-kv[1], kv[0]))
    return FeatureSet(f for f, _ in ranked[:n])


def category_sets(sets: Mapping[str, Iterable], categories: Mapping[str, str | None],
                  min_sets: int) -> dict[str, dict[str, FeatureSet]]:
    """Per unsafe category with at least `min_sets` sets, its prompts' sets."""
    out: dict[str, dict[str, FeatureSet]] = {}
    for pid, s in sets.items():
        if cat := categories.get(pid):
            out.setdefault(cat, {})[pid] = FeatureSet(s)
    return {c: v for c, v in sorted(out.items()) if len(v) >= min_sets}


def active_pool(model: ChatModel, saes, texts: Sequence[str], layers: Sequence[int],
                batch_size: int) -> dict[int, list[int]]:
    """Per layer, every latent active on at least one prompt token of at least one text."""
    pool: dict[int, set[int]] = {l: set() for l in layers}
    for counts in token_counts(model, saes, texts, layers, batch_size):
        for l, c in counts.items():
            pool[l].update(c)
    return {l: sorted(v) for l, v in pool.items()}


def matched_random(target: FeatureSet, pool: Mapping[int, Iterable[int]], exclude: Iterable, seed: int,
                   key: str) -> tuple[FeatureSet, bool]:
    """Latents drawn from `pool` minus `exclude`, as many per layer as `target` has (the random
    control's draw, seeded by (seed, key)); `short`: a layer had too few candidates."""
    ex = set(FeatureSet(exclude))
    free = {l: [i for i in ids if Feature(l, i) not in ex] for l, ids in pool.items()}
    draw = random_sets({key: target}, {key: free}, seed)[key]
    return draw["features"], draw["short"]


def build_interventions(kinds: Sequence[str], stage2: Mapping[str, FeatureSet], categories: Mapping[str, str | None],
                        core_sizes: Sequence[int], category_core_size: int, category_min_sets: int,
                        random_seeds: Sequence[int], pool: Mapping[int, Iterable[int]] | None = None,
                        critical: FeatureSet | None = None, woken: FeatureSet | None = None,
                        clamp_values: Sequence[float] = ()) -> tuple[list[EvalIntervention], list[str]]:
    """The matrix's rows for the selected `kinds`, in display order, and notes on rows left out.
    A latent row whose set equals an earlier one's gets `same_as` (it is not run twice)."""
    rows, notes = [], []
    if "none" in kinds:
        rows.append(EvalIntervention("none", "none"))
    for k in ("direction", "actadd"):
        if k in kinds:
            rows.append(EvalIntervention(k, k))
    union = FeatureSet(f for s in stage2.values() for f in s).sorted()
    cores = [EvalIntervention(f"core@{n}", "core", core_set(stage2, n)) for n in sorted(set(core_sizes))]
    if "core" in kinds:
        rows += cores
    if "random" in kinds:
        if pool is None:
            notes.append("random: no pool of active latents")
        else:
            for c in cores:
                for seed in random_seeds:
                    fs, short = matched_random(c.features, pool, union, seed, f"core@{len(c.features)}")
                    rows.append(EvalIntervention(f"random@{c.name[5:]}/s{seed}", "random", fs, seed=seed,
                                                 matched=c.name, short=short))
    if "core_category" in kinds:
        groups = category_sets(stage2, categories, category_min_sets)
        if not groups:
            notes.append(f"core_category: no category has {category_min_sets} Stage 2 sets")
        for cat, sets in groups.items():
            rows.append(EvalIntervention(f"core[{cat}]@{category_core_size}", "core_category",
                                         core_set(sets, category_core_size), category=cat))
    if "stage2_union" in kinds:
        rows.append(EvalIntervention("stage2_union", "stage2_union", union))
    if "critical_union" in kinds:
        if critical is None:
            notes.append("critical_union: Stage 3 has not run")
        else:
            rows.append(EvalIntervention("critical_union", "critical_union", critical.sorted()))
    if "bos_clamp" in kinds:
        if not woken:
            notes.append("bos_clamp: the run found no dormant latent waking up on BOS (or hydra has not run)")
        else:
            rows += [EvalIntervention(f"bos_clamp@{v:g}", "bos_clamp", woken, clamp=float(v)) for v in clamp_values]
    return _dedupe(rows), notes


def _dedupe(rows: list[EvalIntervention]) -> list[EvalIntervention]:
    first: dict[tuple, str] = {}
    out = []
    for r in rows:
        key = (r.kind == "bos_clamp", r.clamp, tuple(r.features.sorted())) if r.features else None
        if key is not None and key in first:
            r = EvalIntervention(r.name, r.kind, r.features, r.clamp, r.seed, r.category, r.matched, r.short,
                                 same_as=first[key])
        elif key is not None:
            first[key] = r.name
        out.append(r)
    return out


# ----------------------------------------------------------------- measuring
def evaluate_prompts(model: ChatModel, saes, prompts: Sequence[Prompt], plan: Sequence[Intervention], judge: Judge,
                     harmless_judge: Judge | None, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Per prompt under `plan`: the greedy reply, its verdict (harmless prompts go to
    `harmless_judge` when given) and which judge decided, P(refusal tokens) at the first reply
    position, and KL(plain ‖ intervened) of the next-token distributions there."""
    texts = [p.text for p in prompts]
    batch = model.encode(texts)
    plain = model.next_token_probs(batch, batch_size) if plan else None
    with intervene(model, saes, shared=list(plan)):
        probs = model.next_token_probs(batch, batch_size) if plan else None
        gen = model.generate_full(batch, max_new_tokens=max_new_tokens, batch_size=batch_size)
        # inside the block: a judge that reads the model (first-token) sees the intervention
        groups = [(judge, [i for i, p in enumerate(prompts) if harmless_judge is None or p.label != "harmless"]),
                  (harmless_judge, [i for i, p in enumerate(prompts) if harmless_judge and p.label == "harmless"])]
        verdicts: dict[int, tuple] = {}
        for j, idx in groups:
            if j is None or not idx:  # no harmless judge: its group is empty
                continue
            v = _judge(model, j, [texts[i] for i in idx], [gen.texts[i] for i in idx], batch_size)
            for k, i in enumerate(idx):
                verdicts[i] = (v.refused[k], v.degenerate[k], v.jailbroken[k], v.judge)
    kl = kl_divergence(plain, probs).tolist() if plain is not None and probs is not None else [0.0] * len(prompts)
    return [{"id": p.id, "label": p.label, "category": p.category, "prompt": p.text, "completion": gen.texts[i],
             "refused": bool(verdicts[i][0]), "degenerate": bool(verdicts[i][1]),
             "jailbroken": bool(verdicts[i][2]), "judge": verdicts[i][3],
             "p_refusal": float(gen.p_refusal[i]), "kl": float(kl[i])} for i, p in enumerate(prompts)]


def _judge(model: ChatModel, judge: Judge, texts: list[str], replies: list[str], batch_size: int) -> Judged:
    v = judge.judge(texts, replies if judge.needs_completions else None,
                    model=model if judge.needs_model else None, batch_size=batch_size)
    degenerate = list(v.degenerate) if any(v.degenerate) else [is_degenerate(r) for r in replies]
    return Judged(replies, list(v.refused), degenerate, list(v.scores), judge.degenerate_is_jailbreak, v.judge)


# ----------------------------------------------------------------- aggregating
def part_of(row: dict) -> str:
    """A prompt row's part of its dataset: its label (harmful / harmless), else "all"."""
    return row.get("label") or "all"


def prompt_cells(rows: Sequence[dict]) -> list[dict]:
    """One cell per (intervention, dataset, part) from per-prompt rows carrying those keys."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["intervention"], r["dataset"], part_of(r)), []).append(r)
    out = []
    for (iv, ds, part), rs in groups.items():
        n = len(rs)
        out.append({"intervention": iv, "dataset": ds, "part": part, "n": n,
                    "refusal_rate": sum(r["refused"] for r in rs) / n,
                    "jailbreak_rate": sum(r["jailbroken"] for r in rs) / n,
                    "degenerate_rate": sum(r["degenerate"] for r in rs) / n,
                    "mean_p_refusal": mean(r["p_refusal"] for r in rs), "kl": mean(r["kl"] for r in rs),
                    "judges": ",".join(sorted({r["judge"] or "?" for r in rs})), "ce": None, "ce_delta": None,
                    "n_tokens": None})
    return out


def ce_cells(ce: Mapping[str, tuple[float, int]], dataset: str = "general") -> list[dict]:
    """One cell per intervention with the token-weighted CE, and its change from "none"."""
    base = ce["none"][0] / ce["none"][1] if "none" in ce else None
    out = []
    for iv, (s, n) in ce.items():
        v = s / n
        out.append({"intervention": iv, "dataset": dataset, "part": "text", "n": None, "refusal_rate": None,
                    "jailbreak_rate": None, "degenerate_rate": None, "mean_p_refusal": None, "kl": None,
                    "judges": None, "ce": v, "ce_delta": None if base is None else v - base, "n_tokens": n})
    return out


def by_category(rows: Sequence[dict], datasets: Sequence[str] = ("heldout", "search")) -> list[dict]:
    """Jailbreak rate per (intervention, dataset, unsafe category) on the run's harmful prompts."""
    groups: dict[tuple, list[bool]] = {}
    for r in rows:
        if r["dataset"] in datasets:
            groups.setdefault((r["intervention"], r["dataset"], r["category"] or "-"), []).append(r["jailbroken"])
    return [{"intervention": iv, "dataset": ds, "category": c, "n": len(v), "jailbreak_rate": sum(v) / len(v)}
            for (iv, ds, c), v in sorted(groups.items())]
