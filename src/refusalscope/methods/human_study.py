"""The data side of the paper's human study (appendix "Human Study"): which features annotators
see, how their answers are merged, and how activation-based labels are scored against them.

Pipeline features are drawn per number-of-categories bucket (1..5), random features that fire on
the taxonomy and random ones that fire on nothing are added as a baseline; three annotators label
each feature, labels chosen by at least two become ground truth, and the activation labels get
partial credit for each ground-truth label they contain.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from .taxonomy import UNSAFE_CATEGORIES

NONE = "None"
SOURCES = ("pipeline", "random_active", "random_inactive")


def _draw(rng: random.Random, pool: Sequence[str], n: int) -> list[str]:
    return rng.sample(list(pool), min(n, len(pool)))


def sample_study(category_map: Mapping, all_candidates_activity: Mapping, seed: int,
                 per_bucket: int = 10, n_random_active: int = 23, n_random_inactive: int = 7,
                 random_layers: Iterable[int] | None = None, n_buckets: int = 5,
                 shuffle: bool = False) -> list[dict]:
    """Study items {feature, source, activation_labels, n_categories}.

    `category_map`: pipeline feature -> categories it fires on (from `category_map`);
    `all_candidates_activity`: candidate feature -> {category: prompt count} (from
    `category_activity` over e.g. every latent of layers 3-13). Up to `per_bucket` pipeline
    features per number of categories 1..n_buckets (fewer when a bucket is small; duplicates and
    features firing on nothing are dropped), then random features outside the whole pipeline set
    (restricted to `random_layers`) that fire on >= 1 category and on none. The same seed gives
    the same items; `shuffle` mixes the order for blind annotation.
    """
    for name, v in (("per_bucket", per_bucket), ("n_random_active", n_random_active),
                    ("n_random_inactive", n_random_inactive)):
        if v < 0:
            raise UserError(f"{name} must be 0 or more, got {v}")
    rng = random.Random(seed)
    pipe: dict[str, list[str]] = {}
    for f, cats in category_map.items():
        got = pipe.setdefault(Feature.of(f).id, [])
        got += [c for c in cats if c not in got]
    items = []
    for n in range(1, n_buckets + 1):
        bucket = [f for f in FeatureSet(pipe).sorted().ids() if len(pipe[f]) == n]
        for f in sorted(_draw(rng, bucket, per_bucket), key=Feature.of):
            items.append({"feature": f, "source": SOURCES[0], "activation_labels": pipe[f],
                          "n_categories": n})
    layers = None if random_layers is None else {int(l) for l in random_layers}
    labels = {Feature.of(f).id: [c for c, k in counts.items() if k > 0]
              for f, counts in all_candidates_activity.items()}
    pool = [f for f in FeatureSet(labels).sorted().ids()
            if f not in pipe and (layers is None or Feature.of(f).layer in layers)]
    for source, want, active in ((SOURCES[1], n_random_active, True), (SOURCES[2], n_random_inactive, False)):
        cands = [f for f in pool if bool(labels[f]) == active]
        for f in sorted(_draw(rng, cands, want), key=Feature.of):
            items.append({"feature": f, "source": source, "activation_labels": labels[f],
                          "n_categories": len(labels[f])})
    if shuffle:
        rng.shuffle(items)
    return items


def study_breakdown(items: Sequence[Mapping]) -> dict[str, dict[str, int]]:
    """Per source, items by number of activated categories (Table 12 for random_active)."""
    out: dict[str, Counter] = {}
    for it in items:
        out.setdefault(it["source"], Counter())[str(len(it["activation_labels"]))] += 1
    return {s: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for s, c in out.items()}


def _labels(choice) -> list[str]:
    """One annotator's answer as a list of distinct labels; nothing chosen means "None"."""
    if choice is None:
        return [NONE]
    if isinstance(choice, str):
        choice = [choice]
    got = [str(c) for c in dict.fromkeys(choice)]
    return got or [NONE]


def _order(labels: Iterable[str]) -> list[str]:
    labels = set(labels)
    known = [c for c in UNSAFE_CATEGORIES if c in labels]
    return known + sorted(labels - set(UNSAFE_CATEGORIES) - {NONE}) + ([NONE] if NONE in labels else [])


def majority_labels(annotations: Mapping, min_agree: int = 2) -> dict[str, list[str]]:
    """Per feature, the labels chosen by at least `min_agree` annotators ("None" included when
    that many chose nothing); [] when no label reached agreement. `annotations` maps a feature to
    one label list per annotator (an empty list or None counts as choosing "None")."""
    if min_agree < 1:
        raise UserError(f"min_agree must be at least 1, got {min_agree}")
    out = {}
    for f, per_annotator in annotations.items():
        votes = Counter(l for choice in per_annotator for l in _labels(choice))
        out[Feature.of(f).id] = _order(l for l, n in votes.items() if n >= min_agree)
    return out


def _categories(labels) -> set[str]:
    return set() if labels is None else {l for l in _labels(labels) if l != NONE}


def partial_credit(truth: Sequence[str] | None, predicted: Sequence[str] | None) -> float:
    """The paper's score: 1 when the prediction holds every ground-truth label, less an equal
    fraction 1/|truth| per missing label (extra predicted labels cost nothing).

    "None" / empty / None truth means "no category": it scores 1 iff the prediction is also
    no category, else 0. A "None" next to real labels is ignored.
    """
    t, p = _categories(truth), _categories(predicted)
    if not t:
        return float(not p)
    return len(t & p) / len(t)


def study_score(majority: Mapping, activation_labels, sources: Mapping | None = None) -> dict:
    """Mean partial credit of activation labels against majority labels, overall and per source.

    `activation_labels` is feature -> labels, or the study items from `sample_study` (which carry
    each feature's source). Only features present in both are scored; the rest are listed.
    """
    truth = {Feature.of(f).id: v for f, v in majority.items()}
    if isinstance(activation_labels, Mapping):
        pred = {Feature.of(f).id: v for f, v in activation_labels.items()}
        src = {Feature.of(f).id: s for f, s in (sources or {}).items()}
    else:
        pred = {Feature.of(it["feature"]).id: it["activation_labels"] for it in activation_labels}
        src = {Feature.of(it["feature"]).id: it["source"] for it in activation_labels}
    both = FeatureSet(set(truth) & set(pred)).sorted().ids()
    per = {f: partial_credit(truth[f], pred[f]) for f in both}
    by: dict[str, list[float]] = {}
    for f in both:
        by.setdefault(src.get(f, "all"), []).append(per[f])
    def mean(xs):
        return sum(xs) / len(xs) if xs else None
    return {"score": mean(list(per.values())), "n": len(per),
            "by_source": {s: {"score": mean(v), "n": len(v)} for s, v in by.items()},
            "per_feature": per,
            "unscored": FeatureSet(set(truth) ^ set(pred)).sorted().ids()}


def agreement(answers: Mapping[str, Mapping[str, Sequence[str]]], categories: Sequence[str]) -> dict:
    """Inter-annotator agreement over `answers` ({feature: {annotator: labels}}), on items that
    at least two annotators labelled:

    - Krippendorff's alpha with the MASI set distance (nltk), the usual measure for multi-label
      answers, over every such item (annotators may differ per item);
    - Fleiss' kappa per category (statsmodels) on the yes/no "did they tick it" call, over the
      items with the most common number of annotators (Fleiss needs a fixed number), and its mean.
    None where a measure is undefined (fewer than two items, or no variation at all)."""
    from nltk.metrics.agreement import AnnotationTask
    from nltk.metrics.distance import masi_distance
    from statsmodels.stats.inter_rater import fleiss_kappa

    items = {f: {a: set(_labels(l)) for a, l in per.items()} for f, per in answers.items() if len(per) >= 2}
    out: dict = {"n_items": len(items), "alpha_masi": None, "fleiss": {}, "fleiss_mean": None,
                 "fleiss_items": 0, "fleiss_raters": 0}
    if len(items) < 2:
        return out
    data = [(a, f, frozenset(ls)) for f, per in items.items() for a, ls in per.items()]
    try:
        out["alpha_masi"] = float(AnnotationTask(data=data, distance=masi_distance).alpha())
    except ZeroDivisionError:  # every answer identical: no disagreement to measure against
        out["alpha_masi"] = None
    counts = Counter(len(per) for per in items.values())
    n_rat = max(counts, key=lambda n: (counts[n], n))
    fixed = [per for per in items.values() if len(per) == n_rat]
    out.update(fleiss_items=len(fixed), fleiss_raters=n_rat)
    kappas = {}
    for c in [*categories, NONE]:
        yes = [sum(c in ls for ls in per.values()) for per in fixed]
        table = [[n_rat - y, y] for y in yes]
        if len(fixed) >= 2 and 0 < sum(yes) < n_rat * len(fixed):
            kappas[c] = float(fleiss_kappa(table, method="fleiss"))
    out["fleiss"] = kappas
    out["fleiss_mean"] = sum(kappas.values()) / len(kappas) if kappas else None
    return out
