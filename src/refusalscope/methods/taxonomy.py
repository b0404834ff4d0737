"""Map features to the CoCoNot unsafe taxonomy by where they fire (paper: "Mapping causal features
to unsafe taxonomy", Figure 3).

A feature belongs to a harm category when it is non-zero on some token of some prompt of that
category. Only the asked features' encoder columns are computed (JumpReLU/ReLU), so mapping a few
hundred features over thousands of prompts costs a sliver of a full SAE encode.

Features go in as anything `Feature.of` reads; results are keyed by the paper's "layer-index"
strings so they are plain JSON.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..artifacts import atomic_write
from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from ..io.model import ChatModel
from ..io.prompts import Prompt
from .activity import iter_feature_acts

# CoCoNot's five unsafe categories, in the order the bundled harmful set uses.
UNSAFE_CATEGORIES = ("offensive_language", "dangerous_topics", "false_information",
                     "privacy_violations", "copyright_violations")


def layer_features(saes, layers: Iterable[int] | None = None) -> list[str]:
    """Every latent of the given layers (all SAE layers by default): candidates for random draws."""
    layers = saes.layers if layers is None else sorted(set(int(l) for l in layers))
    missing = [l for l in layers if l not in saes]
    if missing:
        raise UserError(f"no SAE for layer(s) {missing}: pick layers among {list(saes.layers)}")
    return [f"{l}-{i}" for l in layers for i in range(saes[l].d_sae)]


def category_activity(model: ChatModel, saes, prompts: Sequence[Prompt], features: Iterable,
                      batch_size: int = 8, threshold: float = 0.0, skip_first: int = 0,
                      quiet: bool = True) -> dict[str, dict[str, int]]:
    """For each feature, how many prompts of each category make it fire (activation > threshold
    at any chat-formatted prompt token). `skip_first` drops each prompt's first tokens (e.g. 1 for
    BOS, where a feature fires on every prompt alike)."""
    if not prompts:
        raise UserError("no prompts to map features on: pass prompts with categories")
    nocat = [p.id or p.text[:40] for p in prompts if not p.category]
    if nocat:
        raise UserError(f"{len(nocat)} prompt(s) have no category (first: {nocat[0]!r}): "
                        "pass prompts labelled with taxonomy categories")
    seen = {p.category for p in prompts}
    cats = [c for c in UNSAFE_CATEGORIES if c in seen] + sorted(seen - set(UNSAFE_CATEGORIES))
    onehot = torch.zeros(len(prompts), len(cats))
    onehot[torch.arange(len(prompts)), torch.tensor([cats.index(p.category) for p in prompts])] = 1
    by_layer = FeatureSet(features).checked(saes).by_layer()
    fired = {l: torch.zeros(len(prompts), len(ix), dtype=torch.bool) for l, ix in by_layer.items()}
    batch = model.encode([p.text for p in prompts])
    for start, sub, acts in iter_feature_acts(model, saes, batch, by_layer, batch_size,
                                              "taxonomy", quiet):
        T = sub.input_ids.shape[1]
        # token j of row b sits at column T - len_b + j (left padding)
        first = (T - sub.lengths).unsqueeze(1) + skip_first
        keep = (torch.arange(T).unsqueeze(0) >= first).unsqueeze(-1)
        for l, a in acts.items():
            fired[l][start:start + len(sub)] = ((a > threshold) & keep).any(dim=1)
    out: dict[str, dict[str, int]] = {}
    for l, ix in by_layer.items():
        counts = fired[l].float().T @ onehot  # [n_features, n_categories]
        for j, i in enumerate(ix):
            out[f"{l}-{i}"] = {c: int(counts[j, k]) for k, c in enumerate(cats)}
    return out


def category_map(activity: dict, min_count: int = 1) -> dict[str, list[str]]:
    """Categories with at least `min_count` activating prompts, per feature ([] if none)."""
    if min_count < 1:
        raise UserError(f"min_count must be at least 1, got {min_count}")
    return {str(Feature.of(f)): [c for c, n in counts.items() if n >= min_count]
            for f, counts in activity.items()}


def category_histogram(cmap: dict, categories: Sequence[str] | None = None) -> dict:
    """Figure 3's counts: features by number of categories (1..n), features firing on exactly one
    category broken down by which, and features firing on none."""
    seen = {c for cs in cmap.values() for c in cs}
    cats = list(categories) if categories is not None else (
        list(UNSAFE_CATEGORIES) + sorted(seen - set(UNSAFE_CATEGORIES)))
    n_by = Counter(len(set(cs)) for cs in cmap.values())
    single = Counter(cs[0] for cs in cmap.values() if len(set(cs)) == 1)
    top = max([len(cats)] + list(n_by))
    return {"by_count": {str(k): n_by.get(k, 0) for k in range(1, top + 1)},
            "single": {c: single.get(c, 0) for c in cats + sorted(set(single) - set(cats))},
            "none": n_by.get(0, 0), "total": len(cmap)}


def plot_category_histogram(hist: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Bar chart like Figure 3: one bar per single category, then one per multi-category count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c.replace("_", " ") for c in hist["single"]]
    values = list(hist["single"].values())
    multi = {k: v for k, v in hist["by_count"].items() if int(k) > 1}
    labels += [f"{k} types" for k in multi]
    values += list(multi.values())
    colors = ["tab:blue"] * len(hist["single"]) + ["tab:orange"] * len(multi)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4))
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(values)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("features")
    ax.set_title(title or f"Features by harm type ({hist.get('total', sum(values))} features, "
                          f"{hist.get('none', 0)} on none)")
    fig.tight_layout()
    fmt = Path(path).suffix[1:] or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, format=fmt))
    finally:
        plt.close(fig)
