"""The factorization machine's arithmetic on non-zeros only, for SAE widths of 10^5-10^6 columns.

A batch of rows is three flat lists (row, column, value) of its non-zeros. The pairwise term
½ Σ_f [(Σ_i v_if x_i)² − Σ_i v_if² x_i²] is two scatter-adds of x_i·v_i over the non-zeros, so a
step costs O(nnz · k) whatever the number of columns. Training gathers the rows of V and w that a
batch touches into small leaf tensors and updates only those rows with a lazy Adam (the rule of
`torch.optim.SparseAdam`): a dense Adam would rewrite all of V (1.7M × 20 at Gemma Scope 65k
over 26 layers) on every step, for rows whose gradient is zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

NNZ_ELEMENTS = 1 << 24  # gathered x·v values per forward chunk (64 MB in fp32) when scoring many rows


@dataclass
class NnzRows:
    """Non-zeros of `n_rows` rows: rows[j], cols[j] (indices into `touched` when that is set,
    else into the full column space), vals[j]; `touched` = the distinct columns, ascending."""

    rows: Tensor
    cols: Tensor
    vals: Tensor
    n_rows: int
    touched: Tensor | None = None


def nnz_rows(X: sp.spmatrix, device, local: bool = False) -> NnzRows:
    """The non-zeros of X on `device`; `local` re-indexes columns onto the distinct ones."""
    X = sp.csr_matrix(X)
    rows = np.repeat(np.arange(X.shape[0], dtype=np.int64), np.diff(X.indptr))
    cols = X.indices.astype(np.int64)
    touched = None
    if local:
        uniq, cols = np.unique(cols, return_inverse=True)
        touched = torch.from_numpy(uniq.astype(np.int64)).to(device)
    as_t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a, dtype=dt)).to(device)  # noqa: E731
    return NnzRows(as_t(rows, np.int64), as_t(cols.ravel(), np.int64), as_t(X.data, np.float32), X.shape[0],
                   touched)


def fm_logits_nnz(w0: Tensor, w: Tensor, V: Tensor, b: NnzRows) -> Tensor:
    """ŷ per row from the non-zeros: w0 + Σ w_i x_i + ½ Σ_f [(Σ x_i v_if)² − Σ (x_i v_if)²]."""
    # index_select, not V[cols]: its backward is index_add_, deterministic on the CPU, where advanced
    # indexing's backward (index_put_ accumulate) adds with threads in any order (resume must match)
    xv_each = V.index_select(0, b.cols) * b.vals.unsqueeze(1)  # [nnz, k]
    shape = (b.n_rows, V.shape[1])
    xv = torch.zeros(shape, dtype=V.dtype, device=V.device).index_add_(0, b.rows, xv_each)
    x2v2 = torch.zeros(shape, dtype=V.dtype, device=V.device).index_add_(0, b.rows, xv_each * xv_each)
    w_each = w.index_select(0, b.cols) * b.vals
    lin = torch.zeros(b.n_rows, dtype=V.dtype, device=V.device).index_add_(0, b.rows, w_each)
    return w0 + lin + 0.5 * (xv * xv - x2v2).sum(1)


@torch.no_grad()
def score_rows(w0: Tensor, w: Tensor, V: Tensor, X: sp.csr_matrix) -> Tensor:
    """Logits of every row of X (fp32, CPU), in chunks of about NNZ_ELEMENTS gathered values."""
    X = sp.csr_matrix(X)
    n = X.shape[0]
    per_row = max(1.0, X.nnz / max(1, n)) * V.shape[1]
    step = max(1, int(NNZ_ELEMENTS // per_row))
    outs = [fm_logits_nnz(w0, w, V, nnz_rows(X[i:i + step], V.device)).float().cpu() for i in range(0, n, step)]
    return torch.cat(outs) if outs else torch.zeros(0)


class LazyAdam:
    """Adam on the rows a step touched: moments of the other rows stay as they were and their
    weights do not move (`torch.optim.SparseAdam`'s rule; the step count, and so the bias
    correction, is global). A tensor updated with every row each step is plain Adam."""

    def __init__(self, params: Sequence[Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: Sequence[tuple[Tensor | None, Tensor]]) -> None:
        """One update; grads[i] = (row index into params[i] or None for all of it, its gradient)."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v, (idx, g) in zip(self.params, self.m, self.v, grads):
            if idx is None:  # every row: in place
                p_rows, m_rows, v_rows = p, m, v
            else:
                p_rows, m_rows, v_rows = p[idx], m[idx], v[idx]
            if self.weight_decay:
                g = g + self.weight_decay * p_rows
            mm = m_rows * b1 + (1 - b1) * g
            vv = v_rows * b2 + (1 - b2) * g * g
            new = p_rows - (self.lr / c1) * mm / ((vv / c2).sqrt() + self.eps)
            if idx is None:
                m.copy_(mm), v.copy_(vv), p.copy_(new)
            else:
                m[idx], v[idx], p[idx] = mm, vv, new
