"""The linear-probe baseline of "Factorization Machines vs. Linear Probe": logistic regression on
the same sparse, max-|x|-scaled activations as the FM, features ranked by |w|. A probe scores
each latent on its own, so it cannot see the interactions the FM's embeddings encode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from ..errors import UserError
from ..interventions.features import Feature
from .fm_data import Split, apply_scale, max_abs_scale


@dataclass
class ProbeResult:
    clf: LogisticRegression
    scale: np.ndarray  # per-column max |x| on train (as for the FM)
    train_acc: float
    test_acc: float | None
    val_acc: float | None = None

    @property
    def weights(self) -> np.ndarray:
        return self.clf.coef_.ravel()

    def accuracy(self, split: Split) -> float:
        return float(self.clf.score(apply_scale(split.X, self.scale), split.y.astype(int)))


def train_probe(train: Split, test: Split | None = None, val: Split | None = None, C: float = 1.0,
                solver: str = "liblinear", seed: int = 0, max_iter: int = 1000) -> ProbeResult:
    """L2 logistic regression (liblinear or saga, both take sparse input; seeded)."""
    if solver not in ("liblinear", "saga"):
        raise UserError(f"probe solver {solver!r} is not supported: use liblinear or saga")
    if len(set(train.y.tolist())) < 2:
        raise UserError("probe training split has a single class: use more prompts of each label")
    scale = max_abs_scale(train.X)
    clf = LogisticRegression(C=C, solver=solver, random_state=seed, max_iter=max_iter)
    clf.fit(apply_scale(train.X, scale), train.y.astype(int))
    res = ProbeResult(clf, scale, 0.0, None)
    res.train_acc = res.accuracy(train)
    if test is not None and len(test):
        res.test_acc = res.accuracy(test)
    if val is not None and len(val):
        res.val_acc = res.accuracy(val)
    return res


def rank_by_weight(probe: ProbeResult, columns: Sequence[Feature], exclude=None) -> list[tuple[Feature, float]]:
    """Features by |w| descending (ties keep column order), minus `exclude` (e.g. the Stage 2 set)."""
    w = np.abs(probe.weights)
    if len(w) != len(columns):
        raise UserError(f"probe has {len(w)} weights but {len(columns)} columns were given: "
                        "pass the columns of the dataset it was trained on")
    drop = set(map(Feature.of, exclude or ()))
    cols = [Feature.of(c) for c in columns]
    return [(cols[j], float(w[j])) for j in np.argsort(-w, kind="stable") if cols[j] not in drop]
