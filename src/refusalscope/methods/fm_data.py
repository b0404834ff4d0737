"""Stage 3 data: SAE activations at the post-instruction tokens, as a sparse prompt × latent matrix.

The paper (appendix "Dataset for training Factorization Machines") records every SAE latent at
the last 4 tokens of each prompt, at layers 2 .. l*, for AdvBench (label 1) and as many Alpaca
prompts (label 0), split 80/10/10. With ~20 layers of 16k–131k latents the dense matrix would be
millions of columns wide, so only non-zero activations are kept (CSR), built chunk by chunk, and
only columns that are non-zero at least once become FM features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..artifacts import atomic_write, save_tensors
from ..errors import UserError
from ..interventions.features import Feature
from ..io.model import ChatModel
from ..io.saes import sae_width

MODES = ("pooled", "tokens")


@dataclass
class FeatureMatrix:
    """Sparse SAE activations. `rows[r] = (prompt index, position)`: position j ∈ [0, n_tokens)
    is the j-th of the prompt's last n_tokens tokens (n_tokens−1 = the last one); −1 in
    "pooled" mode, whose single row per prompt is the max over those positions."""

    columns: list[Feature]
    values: sp.csr_matrix  # [len(rows), len(columns)], float32
    rows: np.ndarray  # [n_rows, 2] int64
    mode: str
    n_tokens: int
    column_of: dict[Feature, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.columns = [Feature.of(c) for c in self.columns]
        self.column_of = {f: j for j, f in enumerate(self.columns)}
        if self.mode not in MODES:
            raise UserError(f"unknown activation mode {self.mode!r}: use pooled or tokens")
        if self.values.shape != (len(self.rows), len(self.columns)):
            raise UserError(f"feature matrix has shape {self.values.shape} but {len(self.rows)} rows "
                            f"and {len(self.columns)} columns: rebuild it")

    @property
    def n_prompts(self) -> int:
        return int(self.rows[:, 0].max()) + 1 if len(self.rows) else 0

    def pooled(self) -> FeatureMatrix:
        """The "pooled" matrix of a "tokens" one: per prompt, the max over its token rows (what
        `collect_sae_activations(mode="pooled")` records; activations are non-negative)."""
        if self.mode == "pooled":
            return self
        n = self.n_prompts
        out = sp.csr_matrix((n, len(self.columns)), dtype=np.float32)
        for j in np.unique(self.rows[:, 1]):
            sel = np.flatnonzero(self.rows[:, 1] == j)
            part = sp.csr_matrix((np.ones(len(sel), np.float32), (self.rows[sel, 0], np.arange(len(sel)))),
                                 shape=(n, len(sel))) @ self.values[sel]
            out = out.maximum(part)
        keep = np.flatnonzero(out.getnnz(axis=0))
        rows = np.stack([np.arange(n), np.full(n, -1)], 1).astype(np.int64)
        return FeatureMatrix([self.columns[k] for k in keep], out[:, keep].tocsr(), rows, "pooled", self.n_tokens)

    def column_labels(self) -> list[str]:
        """The paper's "layer-index" names."""
        return [c.id for c in self.columns]

    def to_torch_sparse(self) -> torch.Tensor:
        """A coalesced COO tensor (COO has the most complete autograd/device support in torch)."""
        return csr_to_torch(self.values)

    def save(self, path: str | os.PathLike) -> Path:
        """safetensors (CSR arrays + columns + rows), written to a temp name then renamed."""
        v = self.values
        tensors = {"indptr": torch.from_numpy(v.indptr.astype(np.int64)),
                   "indices": torch.from_numpy(v.indices.astype(np.int64)),
                   "data": torch.from_numpy(v.data.astype(np.float32)),
                   "columns": torch.from_numpy(feature_array(self.columns)),
                   "rows": torch.from_numpy(self.rows.astype(np.int64)).reshape(-1, 2),
                   "shape": torch.tensor(v.shape, dtype=torch.int64)}
        meta = {"mode": self.mode, "n_tokens": json.dumps(self.n_tokens)}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        return atomic_write(Path(path), lambda tmp: save_tensors(tensors, tmp, meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureMatrix:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        shape = tuple(t["shape"].tolist())
        values = sp.csr_matrix((t["data"].numpy(), t["indices"].numpy(), t["indptr"].numpy()), shape=shape)
        return cls([Feature.of(c) for c in t["columns"].tolist()], values, t["rows"].numpy(),
                   meta["mode"], json.loads(meta["n_tokens"]))


def csr_to_torch(m: sp.spmatrix, device=None) -> torch.Tensor:
    coo = m.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data.astype(np.float32)), coo.shape,
                                   device=device, is_coalesced=True, check_invariants=False)


def stack(parts: Sequence[FeatureMatrix]) -> FeatureMatrix:
    """Matrices of consecutive prompt batches as one: columns the sorted union (what one pass over
    all prompts keeps), prompt indices offset by the prompts before each part."""
    if not parts:
        raise UserError("no activations to stack: collect at least one prompt")
    mode, n_tokens = parts[0].mode, parts[0].n_tokens
    union, columns, own = _union(parts)
    blocks, rows, offset = [], [], 0
    for p, keys in zip(parts, own):
        blocks.append(_align(p, union, keys))
        r = p.rows.copy()
        r[:, 0] += offset
        rows.append(r)
        offset += p.n_prompts
    return FeatureMatrix(columns, sp.vstack(blocks, format="csr", dtype=np.float32),
                         np.concatenate(rows).astype(np.int64).reshape(-1, 2), mode, n_tokens)


def collect_sae_activations(model: ChatModel, saes, prompts: Sequence[str], layers: Sequence[int],
                            n_tokens: int = 4, batch_size: int = 16, quiet: bool = True,
                            mode: str = "pooled", shard_file: Callable[[int, int], Path] | None = None
                            ) -> FeatureMatrix:
    """Every SAE latent at the last `n_tokens` tokens (the post-instruction template tokens) at
    each of `layers`. Prompts go through the model `batch_size` at a time and only non-zeros are
    kept, so memory is O(batch · n_tokens · d_sae) plus the non-zeros. With `shard_file(start,
    stop)`, each batch's matrix is saved there (atomically) as it is done, and a batch whose file
    exists is read instead of recomputed: an interrupted collection resumes where it stopped."""
    if mode not in MODES:
        raise UserError(f"unknown activation mode {mode!r}: use pooled or tokens")
    layers = sorted({int(l) for l in layers})
    missing = [l for l in layers if l not in saes]
    if missing:
        raise UserError(f"no SAE loaded for layers {missing} (SAE layers: {sorted(saes.keys())}): "
                        "add them to saes.layers or drop them from the Stage 3 layers")
    if n_tokens < 1:
        raise UserError(f"n_tokens is {n_tokens}: record at least the last token (n_tokens >= 1)")
    batch = model.encode(list(prompts))
    parts = []
    starts = range(0, len(batch), batch_size)
    for start in tqdm(starts, desc="SAE activations", disable=quiet or len(starts) <= 1):
        stop = min(start + batch_size, len(batch))
        path = None if shard_file is None else shard_file(start, stop)
        if path is not None and path.exists():
            parts.append(FeatureMatrix.load(path))
            continue
        part = _batch_matrix(model, saes, batch.rows(start, stop), layers, n_tokens, mode)
        if path is not None:
            part.save(path)
        parts.append(part)
    return stack(parts)


@torch.no_grad()
def _batch_matrix(model: ChatModel, saes, sub, layers: list[int], n_tokens: int, mode: str) -> FeatureMatrix:
    """One batch's activations: encoded per layer on the SAE's device, non-zeros copied back."""
    offsets = np.cumsum([0] + [sae_width(saes, l) for l in layers])
    per_row = 1 if mode == "pooled" else n_tokens
    res = model.residuals(sub, layers, positions=n_tokens)
    r_idx, c_idx, vals = [], [], []
    for j, layer in enumerate(layers):
        fd = saes[layer]
        acts = fd.encode(res[layer].to(fd.device))  # [b, n_tokens, d_sae]
        if mode == "pooled":
            acts = acts.amax(dim=1, keepdim=True)
        acts = acts.reshape(-1, acts.shape[-1])
        r, c = acts.nonzero(as_tuple=True)
        r_idx.append(r.cpu().numpy().astype(np.int64))
        c_idx.append(c.cpu().numpy().astype(np.int64) + offsets[j])
        vals.append(acts[r, c].float().cpu().numpy())
    n_rows = len(sub) * per_row
    g = np.concatenate(c_idx)
    used, local = np.unique(g, return_inverse=True)
    values = sp.csr_matrix((np.concatenate(vals), (np.concatenate(r_idx), local.ravel())),
                           shape=(n_rows, len(used)), dtype=np.float32)
    layer_of = np.searchsorted(offsets, used, side="right") - 1
    columns = [Feature(layers[k], int(u - offsets[k])) for k, u in zip(layer_of, used)]
    prompt = np.repeat(np.arange(len(sub)), per_row)
    pos = np.full(n_rows, -1) if mode == "pooled" else np.tile(np.arange(n_tokens), len(sub))
    return FeatureMatrix(columns, values, np.stack([prompt, pos], 1).astype(np.int64), mode, n_tokens)


@dataclass
class Split:
    """One split: X [rows, d] over the dataset's columns, y (1 harmful / 0 harmless), and per row
    (label, prompt index within its set, position as in FeatureMatrix.rows), to trace rows back."""

    X: sp.csr_matrix
    y: np.ndarray  # float32
    rows: np.ndarray  # [rows, 3] int64

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass
class FMDataset:
    """The three splits over the FM's columns: the latents non-zero in at least one train row
    (`support[j]`: in how many), out of `n_seen` non-zero anywhere in the data."""

    train: Split
    val: Split
    test: Split
    columns: list[Feature]
    support: np.ndarray
    n_seen: int


def feature_array(columns: Sequence[Feature]) -> np.ndarray:
    """[n, 2] int64 (layer, index) rows; `np.fromiter` is ~20x faster than `np.array` or
    `torch.tensor` on a list of a million tuples."""
    return np.fromiter((x for f in columns for x in f), dtype=np.int64, count=2 * len(columns)).reshape(-1, 2)


def _keys(columns: Sequence[Feature]) -> np.ndarray:
    """Columns as sortable int64 keys (layer << 32 | index): a million of them sort and match in
    numpy in well under a second, where sorting Feature tuples in Python takes seconds."""
    a = feature_array(columns)
    return (a[:, 0] << 32) | a[:, 1]


def _union(mats: Sequence[FeatureMatrix]) -> tuple[np.ndarray, list[Feature], list[np.ndarray]]:
    """The sorted union of the matrices' columns: keys and Features (the matrices' own objects),
    and each matrix's own column keys."""
    own = [_keys(m.columns) for m in mats]
    every = [c for m in mats for c in m.columns]
    keys, first = np.unique(np.concatenate(own), return_index=True)
    return keys, [every[j] for j in first.tolist()], own


def _align(fm: FeatureMatrix, union: np.ndarray, own: np.ndarray) -> sp.csr_matrix:
    """The matrix re-indexed onto the union column space (`union`: its sorted keys; `own`: the
    matrix's column keys)."""
    d = len(union)
    remap = np.searchsorted(union, own)
    v = fm.values.tocoo()
    return sp.csr_matrix((v.data, (v.row, remap[v.col] if len(remap) else v.col)),
                         shape=(v.shape[0], d), dtype=np.float32)


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    n_train = int(round(fractions[0] * n))
    n_val = min(n - n_train, int(round(fractions[1] * n)))
    return n_train, n_val, n - n_train - n_val


def fm_dataset(harmful_acts: FeatureMatrix, harmless_acts: FeatureMatrix, seed: int,
               fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> FMDataset:
    """Label 1/0 sets, split by PROMPT (all token rows of a prompt stay together, so a prompt's
    tokens cannot leak into val/test) and stratified per class, seeded. Columns: the latents
    some train row has (a latent seen only in val/test rows would get no trained embedding)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise UserError(f"split fractions {tuple(fractions)} must be three non-negative numbers "
                        "summing to 1, e.g. (0.8, 0.1, 0.1)")
    if (harmful_acts.mode, harmful_acts.n_tokens) != (harmless_acts.mode, harmless_acts.n_tokens):
        raise UserError("harmful and harmless activations were collected with different mode or "
                        "n_tokens: collect both the same way")
    union, columns, own = _union([harmful_acts, harmless_acts])
    rng = np.random.default_rng(seed)
    parts: list[list] = [[], [], []]
    for label, fm, keys in ((1, harmful_acts, own[0]), (0, harmless_acts, own[1])):
        X = _align(fm, union, keys)
        n = fm.n_prompts
        order = rng.permutation(n)
        n_tr, n_va, _ = split_sizes(n, fractions)
        which = np.empty(n, dtype=np.int64)
        which[order[:n_tr]], which[order[n_tr:n_tr + n_va]], which[order[n_tr + n_va:]] = 0, 1, 2
        # rows in order of (split position of the prompt, position): deterministic and grouped
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        for s in range(3):
            sel = np.flatnonzero(which[fm.rows[:, 0]] == s)
            sel = sel[np.lexsort((fm.rows[sel, 1], rank[fm.rows[sel, 0]]))]
            parts[s].append((X[sel], np.full(len(sel), label, np.float32),
                             np.column_stack([np.full(len(sel), label), fm.rows[sel]])))
    splits = [Split(sp.vstack([p[0] for p in ps]).tocsr().astype(np.float32),
                    np.concatenate([p[1] for p in ps]),
                    np.concatenate([p[2] for p in ps]).astype(np.int64).reshape(-1, 3)) for ps in parts]
    # a column only val/test rows touch would keep its random init embedding: it is no FM column
    support = splits[0].X.getnnz(axis=0)
    seen = int((sum(split.X.getnnz(axis=0) for split in splits) > 0).sum())
    keep = np.flatnonzero(support)
    for split in splits:
        split.X = split.X[:, keep].tocsr()
    return FMDataset(splits[0], splits[1], splits[2], columns=[columns[j] for j in keep],
                     support=support[keep].astype(np.int64), n_seen=seen)


def max_abs_scale(X: sp.spmatrix) -> np.ndarray:
    """Per column, the largest |x| (1 where a column is all zero): dividing by it puts training
    inputs in [-1, 1], since raw SAE activations reach tens to hundreds and would make FM
    interaction terms (products of two inputs) explode."""
    s = np.asarray(abs(X).max(axis=0).todense()).ravel().astype(np.float32)
    s[s == 0] = 1.0
    return s


def apply_scale(X: sp.spmatrix, scale: np.ndarray) -> sp.csr_matrix:
    return (sp.csr_matrix(X) @ sp.diags(1.0 / scale)).tocsr().astype(np.float32)
