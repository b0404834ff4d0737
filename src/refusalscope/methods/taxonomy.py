"""Map features to the CoCoNot unsafe taxonomy by where they fire (paper: "Mapping causal features
to unsafe taxonomy", Figure 3).

A feature belongs to a harm category when it is non-zero on some token of some prompt of that
category: any token, BOS included, as the paper counts. Latents that fire on the BOS / attention
sink fire there on every prompt alike (the hydra latents live there), so `category_views` also
counts with sink positions left out, in the same pass, to report beside the paper's view. Only
the asked features' encoder columns are computed (JumpReLU/ReLU), so mapping a few hundred
features over thousands of prompts costs a sliver of a full SAE encode.

Features go in as anything `Feature.of` reads; results are keyed by the paper's "layer-index"
strings so they are plain JSON.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..artifacts import Checkpoint, atomic_write
from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from ..io.model import ChatModel
from ..io.prompts import Prompt
from ..io.saes import sae_width
from .activity import iter_feature_acts_and_sinks

# CoCoNot's five unsafe categories, in the order the bundled harmful set uses.
UNSAFE_CATEGORIES = ("offensive_language", "dangerous_topics", "false_information",
                     "privacy_violations", "copyright_violations")


def layer_features(saes, layers: Iterable[int] | None = None) -> list[str]:
    """Every latent of the given layers (all SAE layers by default): candidates for random draws."""
    layers = saes.layers if layers is None else sorted(set(int(l) for l in layers))
    missing = [l for l in layers if l not in saes]
    if missing:
        raise UserError(f"no SAE for layer(s) {missing}: pick layers among {list(saes.layers)}")
    return [f"{l}-{i}" for l in layers for i in range(sae_width(saes, l))]


class LatentPool(Sequence[str]):
    """Every latent of the given layers ("layer-index", in `layer_features` order) minus
    `exclude`, as a lazy sequence: `random.Random.sample` draws from it exactly as from the
    list, without building 1.3M strings (20 layers x 65,536) or scanning them per draw."""

    def __init__(self, saes, exclude: Iterable = (), layers: Iterable[int] | None = None):
        self.layers = saes.layers if layers is None else sorted(set(int(l) for l in layers))
        sizes = [sae_width(saes, l) for l in self.layers]  # a lazy set's headers: no layer read
        self.starts = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
        at = {l: self.starts[j] for j, l in enumerate(self.layers)}
        width = dict(zip(self.layers, sizes))
        gone = sorted({at[f.layer] + f.index for f in FeatureSet(exclude)
                       if f.layer in at and f.index < width[f.layer]})
        self.shift = [p - m for m, p in enumerate(gone)]  # free positions before each excluded one
        self.n = self.starts[-1] - len(gone)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self.n))]
        if not -self.n <= j < self.n:
            raise IndexError(j)
        j %= self.n
        p = j + bisect.bisect_right(self.shift, j)
        layer = bisect.bisect_right(self.starts, p) - 1
        return f"{self.layers[layer]}-{p - self.starts[layer]}"


# Spellings of CoCoNot's unsafe subcategories (and ours) -> the five names above.
_CATEGORY_WORDS = (("offensive", "offensive_language"), ("dangerous", "dangerous_topics"),
                   ("false", "false_information"), ("misinform", "false_information"),
                   ("privacy", "privacy_violations"), ("copyright", "copyright_violations"))


def unsafe_category(name: str) -> str:
    """One of UNSAFE_CATEGORIES for CoCoNot's subcategory names in any spelling ("triggers for
    offensive language", "dangerous_or_sensitive_topics", …); other names lowercased with "_"."""
    low = name.strip().lower()
    for word, cat in _CATEGORY_WORDS:
        if word in low:
            return cat
    return "_".join(low.replace("-", " ").split())


def taxonomy_prompts(prompts: Sequence[Prompt], field: str = "category", only: str | None = None) -> list[Prompt]:
    """Prompts labelled with a harm type for the mapping: those whose category is `only` (CoCoNot:
    "Requests with safety concerns"), labelled by `field` ("category" or "subcategory"), with
    the label normalised by `unsafe_category`. Prompts without the label are left out."""
    if field not in ("category", "subcategory"):
        raise UserError(f"taxonomy field {field!r}: use category or subcategory")
    keep = [p for p in prompts if only is None or (p.category or "").strip().lower() == only.strip().lower()]
    out = [replace(p, category=unsafe_category(getattr(p, field))) for p in keep if getattr(p, field)]
    if not out:
        have = sorted({p.category or "" for p in prompts})[:5]
        raise UserError(
            f"no prompt has a {field}"
            + (f" under category {only!r}" if only else "")
            + f" (categories seen: {have}): check analyses.taxonomy_prompts / taxonomy_field / taxonomy_only"
        )
    return out


def category_activity(model: ChatModel, saes, prompts: Sequence[Prompt], features: Iterable,
                      batch_size: int = 8, threshold: float = 0.0, skip_first: int = 0,
                      quiet: bool = True, sink_ratio: float | None = None,
                      checkpoint: Checkpoint | None = None) -> dict[str, dict[str, int]]:
    """For each feature, how many prompts of each category make it fire (activation > threshold
    at any chat-formatted prompt token, BOS included: the paper's count). `skip_first` drops
    each prompt's first tokens; `sink_ratio` drops high-norm sink positions (see `sinks`)."""
    every, no_sinks = category_views(model, saes, prompts, features, batch_size, threshold, skip_first,
                                     quiet, 4.0 if sink_ratio is None else sink_ratio, checkpoint)
    return every if sink_ratio is None else no_sinks


def category_views(model: ChatModel, saes, prompts: Sequence[Prompt], features: Iterable,
                   batch_size: int = 8, threshold: float = 0.0, skip_first: int = 0,
                   quiet: bool = True, sink_ratio: float = 4.0, checkpoint: Checkpoint | None = None
                   ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """`category_activity` both ways in one pass: (every token counts, sink positions left out).
    With a `checkpoint` (key "start"), each chunk's firings are appended as it finishes and chunks
    found there are not run again: a resumed pass counts exactly as an uninterrupted one."""
    if not prompts:
        raise UserError("no prompts to map features on: pass prompts with categories")
    nocat = [p.id or p.text[:40] for p in prompts if not p.category]
    if nocat:
        raise UserError(f"{len(nocat)} prompt(s) have no category (first: {nocat[0]!r}): "
                        "pass prompts labelled with taxonomy categories")
    labels = [p.category for p in prompts if p.category]  # every prompt has one (checked above)
    seen = set(labels)
    cats = [c for c in UNSAFE_CATEGORIES if c in seen] + sorted(seen - set(UNSAFE_CATEGORIES))
    onehot = torch.zeros(len(prompts), len(cats))
    onehot[torch.arange(len(prompts)), torch.tensor([cats.index(c) for c in labels])] = 1
    by_layer = FeatureSet(features).checked(saes).by_layer()
    fired = [{l: torch.zeros(len(prompts), len(ix), dtype=torch.bool) for l, ix in by_layer.items()}
             for _ in range(2)]
    batch = model.encode([p.text for p in prompts])
    done = checkpoint.records if checkpoint is not None else {}
    for rec in done.values():
        _restore_fired(fired, rec)
    for start, sub, acts, sink in iter_feature_acts_and_sinks(model, saes, batch, by_layer, batch_size,
                                                              "taxonomy", quiet, sink_ratio, skip=done):
        T = sub.input_ids.shape[1]
        # token j of row b sits at column T - len_b + j (left padding)
        first = (T - sub.lengths).unsqueeze(1) + skip_first
        keep = torch.arange(T).unsqueeze(0) >= first
        for l, a in acts.items():
            on = a > threshold
            fired[0][l][start:start + len(sub)] = (on & keep.unsqueeze(-1)).any(dim=1)
            fired[1][l][start:start + len(sub)] = (on & (keep & ~sink[l]).unsqueeze(-1)).any(dim=1)
        if checkpoint is not None:
            checkpoint.add({"start": start, "rows": len(sub),
                            "fired": [{str(l): f[l][start:start + len(sub)].nonzero().tolist() for l in by_layer}
                                      for f in fired]})
    views = []
    for f in fired:
        out: dict[str, dict[str, int]] = {}
        for l, ix in by_layer.items():
            counts = f[l].float().T @ onehot  # [n_features, n_categories]
            for j, i in enumerate(ix):
                out[f"{l}-{i}"] = {c: int(counts[j, k]) for k, c in enumerate(cats)}
        views.append(out)
    return views[0], views[1]


def _restore_fired(fired: list[dict[int, torch.Tensor]], rec: dict) -> None:
    """A checkpointed chunk's firings ((row in chunk, column) pairs per view and layer) put back."""
    for f, view in zip(fired, rec["fired"]):
        for l, pairs in view.items():
            if pairs:
                rows, cols = torch.tensor(pairs).T
                f[int(l)][rec["start"] + rows, cols] = True


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
