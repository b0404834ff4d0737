"""Stage 3: a second-order factorization machine (Rendle 2010; the paper's eq. 2) on sparse SAE
activations, and the ranking of non-Stage-2 latents by FM-embedding similarity to Stage 2.

    ŷ(x) = w0 + Σ_i w_i x_i + Σ_{i<j} ⟨v_i, v_j⟩ x_i x_j
         = w0 + Σ_i w_i x_i + ½ Σ_f [(Σ_i v_if x_i)² − Σ_i v_if² x_i²]

The second form costs O(k·nnz(x)): two sparse × dense products, XV and (X∘X)(V∘V). Training
uses the logistic loss on ŷ, Adam, and keeps the epoch with the best validation accuracy
(ties: lower validation loss), as the paper does. By default inputs are divided column-wise by
their max |x| on the train split (`fm_data.max_abs_scale`; the paper does not say how it feeds
activations in); the scale is stored with the result and applied to every other input, since
raw activations (tens to hundreds) would blow up x_i·x_j. `scale="none"` feeds them raw.

Ranking (the paper's "cosine similarity between their FM embeddings and those of the Stage 2
features"): per prompt against that prompt's own Stage 2 set (`rank_per_prompt`), or once
against the union of every prompt's Stage 2 latents (`rank_by_embedding_similarity`). With
thousands of anchors the union's max cosine saturates near 1 for almost every latent, so the
global max ranking is close to arbitrary on a real model; per prompt, mean cosine is the default.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..artifacts import atomic_write_tensors, read_tensors
from ..errors import UserError
from ..interventions.features import Feature
from .fm_data import Split, apply_scale, max_abs_scale
from .fm_sparse import LazyAdam, NnzRows, fm_logits_nnz, nnz_rows, score_rows


class FactorizationMachine(nn.Module):
    """w0, w [d], V [d, k]; forward takes a sparse (COO/CSR) or dense [B, d] and returns logits [B]."""

    def __init__(self, d: int, k: int = 20, init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        if k < 1 or d < 1:
            raise UserError(f"FM needs d >= 1 features and embedding size k >= 1 (got d={d}, k={k})")
        self.w0 = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.zeros(d))
        self.V = nn.Parameter(torch.randn(d, k, generator=generator) * init_std)

    @property
    def d(self) -> int:
        return self.V.shape[0]

    @property
    def k(self) -> int:
        return self.V.shape[1]

    def forward(self, X: Tensor) -> Tensor:
        X2 = _square(X)
        lin = _mm(X, self.w.unsqueeze(1)).squeeze(1)
        xv = _mm(X, self.V)  # [B, k]
        x2v2 = _mm(X2, self.V * self.V)
        return self.w0 + lin + 0.5 * (xv * xv - x2v2).sum(1)


def _square(X: Tensor) -> Tensor:
    if X.layout == torch.sparse_coo:
        X = X.coalesce()
        return torch.sparse_coo_tensor(X.indices(), X.values() ** 2, X.shape, is_coalesced=True,
                                       check_invariants=False)
    if X.layout == torch.sparse_csr:
        return torch.sparse_csr_tensor(X.crow_indices(), X.col_indices(), X.values() ** 2, X.shape,
                                       check_invariants=False)
    return X * X


def _mm(X: Tensor, W: Tensor) -> Tensor:
    return torch.sparse.mm(X, W) if X.layout == torch.sparse_coo else X @ W


@dataclass
class FMResult:
    """The best-validation-epoch FM, the train-split column scale, accuracies and per-epoch history."""

    model: FactorizationMachine
    scale: np.ndarray
    best_epoch: int
    train_acc: float
    val_acc: float
    test_acc: float | None
    history: list[dict] = field(default_factory=list)  # epoch, loss, train_acc, val_acc, val_loss

    @torch.no_grad()
    def logits(self, X: sp.spmatrix) -> np.ndarray:
        """Logits for raw (unscaled) rows; the stored train scale is applied here."""
        return _logits(self.model, apply_scale(X, self.scale)).numpy()

    def accuracy(self, split: Split) -> float:
        """Per row (per token in "tokens" mode)."""
        return _accuracy(self.logits(split.X), split.y)

    def prompt_accuracy(self, split: Split) -> float:
        """Per prompt: the mean logit over a prompt's rows (its tokens) decides its label, so
        pooled and per-token FMs compare on the same unit."""
        if not len(split):
            return float("nan")
        keys, inverse = np.unique(split.rows[:, :2], axis=0, return_inverse=True)
        inverse = inverse.ravel()
        sums = np.bincount(inverse, weights=self.logits(split.X), minlength=len(keys))
        counts = np.bincount(inverse, minlength=len(keys))
        return _accuracy(sums / counts, keys[:, 0])


    def save(self, path: str | os.PathLike) -> Path:
        """Weights, scale and the fit's numbers in one safetensors file (atomic): a checkpoint a
        resumed stage reads instead of training again."""
        meta = {"best_epoch": self.best_epoch, "train_acc": self.train_acc, "val_acc": self.val_acc,
                "test_acc": self.test_acc, "history": self.history}
        return atomic_write_tensors(Path(path), {**self.model.state_dict(), "scale": torch.from_numpy(self.scale)},
                                    meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> FMResult:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        t = read_tensors(Path(path))
        fm = FactorizationMachine(*t["V"].shape)
        fm.load_state_dict({k: t[k] for k in ("w0", "w", "V")})
        return cls(fm.to(device).eval(), t["scale"].numpy(), meta["best_epoch"], meta["train_acc"], meta["val_acc"],
                   meta["test_acc"], meta["history"])


def _logits(fm: FactorizationMachine, Xs: sp.csr_matrix) -> Tensor:
    return score_rows(fm.w0, fm.w, fm.V, Xs)


def _accuracy(logits, y) -> float:
    return float(((np.asarray(logits) > 0) == (np.asarray(y) > 0.5)).mean()) if len(y) else float("nan")


SCALES = ("max_abs", "none")


def train_fm(train: Split, val: Split, test: Split | None = None, k: int = 20, lr: float = 1e-3,
             epochs: int = 20, batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0,
             init_std: float = 0.01, device: str | torch.device = "cpu", quiet: bool = True,
             scale: str = "max_abs") -> FMResult:
    """Fit an FM with BCE-with-logits loss and Adam (lazy: a step moves only the rows of w and V
    its batch touched, `fm_sparse.LazyAdam`) on `device`, from the non-zeros only; init and
    shuffling come from one torch.Generator(seed), so a seed gives the same weights every run
    (on CPU). `scale`: "max_abs" divides each column by its train max |x|, "none" feeds raw
    activations."""
    if len(train) == 0 or len(val) == 0:
        raise UserError("FM training needs non-empty train and validation splits: use more prompts")
    if scale not in SCALES:
        raise UserError(f"unknown FM input scale {scale!r}: use max_abs or none")
    g = torch.Generator().manual_seed(seed)
    d = train.X.shape[1]
    col_scale = max_abs_scale(train.X) if scale == "max_abs" else np.ones(d, dtype=np.float32)
    Xtr, Xva = apply_scale(train.X, col_scale), apply_scale(val.X, col_scale)
    ytr, yva = torch.from_numpy(train.y.astype(np.float32)), torch.from_numpy(val.y.astype(np.float32))
    fm = FactorizationMachine(d, k, init_std, generator=g).to(device)
    opt = LazyAdam([fm.w0, fm.w, fm.V], lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    best, best_key, history = None, None, []
    for epoch in tqdm(range(epochs), desc=f"FM k={k}", disable=quiet):
        order = torch.randperm(len(train), generator=g).numpy()
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            total += _step(fm, opt, nnz_rows(Xtr[idx], fm.V.device, local=True), ytr[idx], loss_fn) * len(idx)
        with torch.no_grad():
            lt, lv = _logits(fm, Xtr), _logits(fm, Xva)
            val_loss = loss_fn(lv, yva).item()
        rec = {"epoch": epoch, "loss": total / len(order), "train_acc": _accuracy(lt, train.y),
               "val_acc": _accuracy(lv, val.y), "val_loss": val_loss}
        history.append(rec)
        key = (rec["val_acc"], -val_loss)
        if best_key is None or key > best_key:
            best_key, best = key, (epoch, copy.deepcopy(fm.state_dict()))
    assert best is not None  # epochs >= 1: the first epoch sets it
    fm.load_state_dict(best[1])
    res = FMResult(fm.eval(), col_scale, best[0], history[best[0]]["train_acc"], history[best[0]]["val_acc"], None,
                   history)
    if test is not None and len(test):
        res.test_acc = res.accuracy(test)
    return res


def _step(fm: FactorizationMachine, opt: LazyAdam, b: NnzRows, y: Tensor, loss_fn) -> float:
    """One batch: gather the touched rows of w and V as leaves, backprop, update those rows."""
    assert b.touched is not None
    w0 = fm.w0.detach().clone().requires_grad_()
    w = fm.w.detach()[b.touched].requires_grad_()
    V = fm.V.detach()[b.touched].requires_grad_()
    loss = loss_fn(fm_logits_nnz(w0, w, V, b), y.to(V.device))
    loss.backward()
    assert w0.grad is not None and w.grad is not None and V.grad is not None
    opt.step([(None, w0.grad), (b.touched, w.grad), (b.touched, V.grad)])
    return loss.item()


def _embeddings(fm) -> Tensor:
    model = fm.model if isinstance(fm, FMResult) else fm
    return model.V.detach().float().cpu()


def _unit(V: Tensor) -> Tensor:
    return V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rank_by_embedding_similarity(fm, columns: Sequence[Feature], stage2_features, exclude=None,
                                 aggregate: str = "mean", chunk: int = 65536,
                                 rankable: np.ndarray | None = None) -> list[tuple[Feature, float]]:
    """Features not in `exclude` (default: the Stage 2 set), by the cosine similarity of their
    embedding v_i to the embeddings of the Stage 2 latents that are FM columns (a latent never
    active in the data has no trained embedding): aggregate "max" = the closest Stage 2 latent
    (a feature that interacts strongly with any one of them), "mean" = cosine to the average of
    the unit Stage 2 embeddings (their mean cosine). Descending; ties keep column order.
    `rankable` (a mask over columns) leaves the others out of the ranking (they still anchor)."""
    columns, U = _unit_columns(fm, columns, aggregate)
    stage2 = set(map(Feature.of, stage2_features))
    exclude = stage2 if exclude is None else set(map(Feature.of, exclude))
    anchors = [j for j, c in enumerate(columns) if c in stage2]
    if not anchors:
        raise UserError("none of the Stage 2 latents is an FM column (none was ever active in the "
                        "Stage 3 data): set stage3.layers to include layers of the Stage 2 latents")
    keep = np.array([c not in exclude for c in columns], dtype=bool)
    if rankable is not None:
        keep &= np.asarray(rankable, dtype=bool)
    return _ranked(columns, _scores(U, anchors, aggregate, chunk), keep)


def _unit_columns(fm, columns: Sequence, aggregate: str) -> tuple[list[Feature], Tensor]:
    """The columns as Features and the FM's unit embeddings, checked against each other."""
    if aggregate not in ("max", "mean"):
        raise UserError(f"unknown similarity aggregate {aggregate!r}: use max or mean")
    feats = [Feature.of(c) for c in columns]
    U = _unit(_embeddings(fm))
    if U.shape[0] != len(feats):
        raise UserError(f"FM has {U.shape[0]} embeddings but {len(feats)} columns were given: "
                        "pass the columns of the dataset the FM was trained on")
    return feats, U


def _scores(U: Tensor, anchors: Sequence[int], aggregate: str, chunk: int = 65536) -> np.ndarray:
    """Per column, its mean cosine to the anchors (U @ mean of the unit anchors is exactly the
    mean of the cosines) or its max cosine."""
    A = U[list(anchors)]
    if aggregate == "mean":
        return (U @ A.mean(0)).numpy()
    return torch.cat([(U[i:i + chunk] @ A.T).amax(1) for i in range(0, len(U), chunk)]).numpy()


def _ranked(columns: Sequence[Feature], s: np.ndarray, keep: np.ndarray, top: int | None = None):
    """Kept columns by descending score (ties: column order), the first `top` of them."""
    n = int(keep.sum()) if top is None else min(int(top), int(keep.sum()))
    key = np.where(keep, -s, np.inf)
    if n == 0:
        return []
    if n < len(key) // 4:  # the head of a million columns: select, then sort only the tied-or-better ones
        cut = np.partition(key, n - 1)[n - 1]
        head = np.flatnonzero(key <= cut)  # ascending column order, so a stable sort keeps ties as a full sort does
        order = head[np.argsort(key[head], kind="stable")][:n]
    else:
        order = np.argsort(key, kind="stable")[:n]
    return [(columns[j], float(s[j])) for j in order]


def rank_per_prompt(fm, columns: Sequence[Feature], sets: Mapping[str, Iterable], top: int,
                    aggregate: str = "mean", rankable: np.ndarray | None = None
                    ) -> dict[str, list[tuple[Feature, float]]]:
    """Per prompt, the `top` latents by FM-embedding similarity to THAT prompt's Stage 2 set
    (the prompt's own latents excluded; with `rankable`, only the columns it marks). A prompt
    none of whose latents is an FM column gets an empty list (the caller decides what to fall
    back to)."""
    columns, U = _unit_columns(fm, columns, aggregate)
    col = {c: j for j, c in enumerate(columns)}
    out: dict[str, list[tuple[Feature, float]]] = {}
    for pid, feats in sets.items():
        own = [Feature.of(f) for f in feats]
        anchors = [col[f] for f in own if f in col]
        if not anchors:
            out[pid] = []
            continue
        keep = np.ones(len(columns), dtype=bool) if rankable is None else np.array(rankable, dtype=bool)
        keep[anchors] = False
        out[pid] = _ranked(columns, _scores(U, anchors, aggregate), keep, top)
    return out


def embedding_collapse(fm, max_n: int = 2000, seed: int = 0) -> float:
    """Mean pairwise cosine similarity of the embeddings (i ≠ j), on a seeded sample of at most
    `max_n`; near 1 means every feature got the same direction (the paper's k=5 failure)."""
    U = _unit(_embeddings(fm))
    if len(U) > max_n:
        U = U[torch.randperm(len(U), generator=torch.Generator().manual_seed(seed))[:max_n]]
    n = len(U)
    if n < 2:
        raise UserError("embedding collapse needs at least two FM features")
    s = U.sum(0)
    return float(((s @ s) - (U * U).sum()) / (n * (n - 1)))
