"""The one hook manager: applies interventions (shared, or one list per batch row) to a ChatModel.

Feature ablation uses the exact sparse identity (DESIGN.md): with the error term kept,
h̃ = h − Σ_{i∈S} f_i(h)·W_dec[i], and for JumpReLU/ReLU SAEs f_i needs only encoder column i.
So a layer's hook costs O(d·|U|) for the union U of latents any row ablates there, instead of a
full O(d·d_sae) encode. TopK SAEs need every pre-activation to decide membership: the sparse
path computes them all but still decodes only U. `mode="reference"` runs the full SAELens
encode/decode with the error term, the hook an SAELens user would write, for tests and
benchmarks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..io.hooks import EMBED, HookFn, HookPoint
from ..io.saes import FeatureDictionary
from .spec import (
    ActAdd,
    DirectionAblation,
    FeatureAblation,
    FeatureClamp,
    Intervention,
    Positions,
    Recording,
    RowAblations,
)


def position_mask(step, positions: Positions) -> Tensor:
    """[B, T] bool: which tokens of the current chunk an intervention applies to."""
    if positions == "all":
        return ~step.is_pad
    if positions == "prompt":
        return step.is_prompt
    if positions == "generated":
        return ~step.is_prompt & ~step.is_pad
    idx = torch.as_tensor(positions, device=step.token_index.device)
    return torch.isin(step.token_index, idx)


class HookTarget(Protocol):
    """What the engine needs of a model: a `ChatModel`, or `apply`'s view of a plain transformers model."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def d_model(self) -> int: ...

    @property
    def n_layers(self) -> int: ...

    def hooks(self, fns: dict[HookPoint, HookFn | list[HookFn]] | None = None) -> AbstractContextManager[None]: ...


class _LayerFeatures:
    """Per layer: the union of latents any row ablates or clamps, gathered once, and per-row masks."""

    def __init__(self, fd: FeatureDictionary, n_rows: int, device, dtype):
        self.fd = fd
        self.n_rows = n_rows
        self.ids: list[int] = []
        self.ablate: list[tuple[int | None, int, Positions]] = []  # (row or None=all, col, positions)
        self.clamp: list[tuple[int | None, int, float, Positions]] = []
        self.ablate_rows: list[tuple[Tensor, Tensor, Positions]] = []  # (rows, cols) arrays: RowAblations
        self.device, self.dtype = device, dtype
        self._index: dict[int, int] = {}

    def col(self, i: int) -> int:
        if not 0 <= i < self.fd.d_sae:
            raise UserError(f"feature {self.fd.layer}-{i} does not exist: layer {self.fd.layer}'s SAE "
                            f"has {self.fd.d_sae} latents")
        if i not in self._index:
            self._index[i] = len(self.ids)
            self.ids.append(i)
        return self._index[i]

    def add_rows(self, rows: np.ndarray, ids: np.ndarray, positions: Positions) -> None:
        """Row r ablates latent ids[j] where rows[j] = r (column lookups once per distinct latent)."""
        uniq, inv = np.unique(ids, return_inverse=True)
        cols = np.array([self.col(int(i)) for i in uniq], dtype=np.int64)[inv.ravel()]
        self.ablate_rows.append((torch.from_numpy(rows), torch.from_numpy(cols), positions))

    def finalize(self):
        """Gather encoder columns and decoder rows of the union, and build per-row masks."""
        fd = self.fd.to(self.device, self.dtype)
        idx = torch.tensor(self.ids, dtype=torch.long, device=self.device)
        self.W_enc, self.b_enc = fd.W_enc[:, idx].contiguous(), fd.b_enc[idx]
        self.theta, self.W_dec = fd.threshold[idx], fd.W_dec[idx].contiguous()
        self.b_dec, self.fd_dev = fd.b_dec, fd
        self.groups: dict[Positions, tuple[Tensor, Tensor, Tensor | None]] = {}
        by_pos = defaultdict(list)
        for row, col, pos in self.ablate:
            by_pos[pos].append((row, col, None))
        for row, col, val, pos in self.clamp:
            by_pos[pos].append((row, col, val))
        arrays = defaultdict(list)
        for rows, cols, pos in self.ablate_rows:
            arrays[pos].append((rows, cols))
        for pos in {**by_pos, **arrays}:
            self.groups[pos] = self._tables(by_pos.get(pos, []), arrays.get(pos, []))

    def _tables(self, entries, arrays=()) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-row mask / clamp target / clamp flag [rows, |U|], filled on the CPU with one index
        write per kind and moved once (element-wise writes on a GPU cost a launch each)."""
        shape = (self.n_rows, len(self.ids))
        mask, target, clamped = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        for rows, cols in arrays:
            if len(rows) and int(rows.max()) >= self.n_rows:
                raise UserError(f"an ablation names row {int(rows.max())} but the batch has {self.n_rows} rows: "
                                "pass one (empty) intervention list per row")
            mask[rows, cols] = 1.0
        shared = [(col, val) for row, col, val in entries if row is None]
        per = [(row, col, val) for row, col, val in entries if row is not None]
        if per:
            r = torch.tensor([e[0] for e in per])
            c = torch.tensor([e[1] for e in per])
            mask[r, c] = 1.0
            cl = [(row, col, val) for row, col, val in per if val is not None]
            if cl:
                r, c = torch.tensor([e[0] for e in cl]), torch.tensor([e[1] for e in cl])
                target[r, c] = torch.tensor([float(e[2]) for e in cl])
                clamped[r, c] = 1.0
        if shared:  # rows=None entries apply to every row and win over per-row ones
            mask[:, torch.tensor([e[0] for e in shared])] = 1.0
            cl_shared = [(col, val) for col, val in shared if val is not None]
            if cl_shared:
                c = torch.tensor([e[0] for e in cl_shared])
                target[:, c] = torch.tensor([float(e[1]) for e in cl_shared])
                clamped[:, c] = 1.0
        move = dict(device=self.device, dtype=self.dtype)
        return mask.to(**move), target.to(**move), clamped.to(**move) if clamped.any() else None

    def activations(self, h: Tensor) -> Tensor:
        """f_U(h) for the union U, exact for every architecture."""
        x = h.to(self.dtype)
        if self.fd.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.fd.architecture == "topk":
            kth = self.fd_dev.pre_activations(h).topk(self.fd.k, dim=-1).values[..., -1:]
            return pre.relu() * (pre >= kth)
        f = pre.relu()
        return f * (pre > self.theta) if self.fd.architecture == "jumprelu" else f


class Intervener:
    """Compiles interventions into per-layer hook functions (see `intervene`)."""

    def __init__(self, model: HookTarget, saes, shared: Sequence[Intervention], rows, mode: str,
                 record: Recording | None):
        if mode not in ("sparse", "reference"):
            raise UserError(f"unknown ablation mode {mode!r}: use sparse or reference")
        self.model, self.saes, self.mode, self.record = model, saes, mode, record
        self.per_row = rows is not None
        self.n_rows = len(rows) if rows is not None else 1
        for layer in (record.features if record is not None else {}):
            if saes is None or layer not in saes:
                raise UserError(f"cannot record layer {layer}: no SAE loaded there")
        self.device, self.dtype = model.device, model.dtype
        self._pm_step: object = None
        self._pm: dict[tuple[object, object], Tensor] = {}
        self.directions: dict = defaultdict(list)  # point -> [(row|None, unit dir)]
        self.adds: dict = defaultdict(list)  # layer -> [(row|None, vector)]
        self.features: dict[int, _LayerFeatures] = {}
        for iv in shared:
            self._add(iv, None)
        for r, ivs in enumerate(rows or []):
            for iv in ivs:
                self._add(iv, r)
        for lf in self.features.values():
            lf.finalize()
        self.dir_tables = {p: self._table(v, unit=True) for p, v in self.directions.items()}
        self.add_tables = {p: self._table(v, unit=False) for p, v in self.adds.items()}

    def _table(self, entries, unit: bool) -> tuple[Tensor, Tensor]:
        """Shared vectors [m, d] and per-row vectors [n_rows, m', d] (zero rows where unused), so
        a batch with a different direction per row costs one batched projection."""
        d = self.model.d_model
        shared = [v for r, v in entries if r is None]
        per = defaultdict(list)
        for r, v in entries:
            if r is not None:
                per[r].append(v)
        width = max((len(v) for v in per.values()), default=0)
        table = torch.zeros(self.n_rows, width, d, device=self.device, dtype=self.dtype)
        for r, vs in per.items():
            for j, v in enumerate(vs):
                table[r, j] = v
        sh = torch.stack(shared) if shared else torch.zeros(0, d, device=self.device, dtype=self.dtype)
        return sh, table

    def _layer(self, layer: int) -> _LayerFeatures:
        if layer not in self.features:
            if self.saes is None or layer not in self.saes:
                have = sorted(self.saes.keys()) if self.saes is not None else []
                raise UserError(f"no SAE loaded for layer {layer} (SAE layers: {have}): add it to "
                                "saes.layers or drop those features")
            self.features[layer] = _LayerFeatures(self.saes[layer], self.n_rows, self.device, self.dtype)
        return self.features[layer]

    def _add(self, iv: Intervention, row: int | None) -> None:
        if isinstance(iv, DirectionAblation):
            points = [EMBED] + list(range(self.model.n_layers)) if iv.layers is None else list(iv.layers)
            for p in points:
                self.directions[p].append((row, iv.direction.to(self.device, self.dtype)))
        elif isinstance(iv, ActAdd):
            self.adds[iv.layer].append((row, iv.vector.to(self.device, self.dtype)))
        elif isinstance(iv, FeatureAblation):
            for layer, ids in iv.features.items():
                lf = self._layer(layer)
                lf.ablate += [(row, lf.col(i), iv.positions) for i in ids]
        elif isinstance(iv, RowAblations):
            for layer, (row_of, latents) in iv.features.items():
                self._layer(layer).add_rows(row_of, latents, iv.positions)
        elif isinstance(iv, FeatureClamp):
            for layer, vals in iv.values.items():
                lf = self._layer(layer)
                lf.clamp += [(row, lf.col(i), v, iv.positions) for i, v in vals.items()]
        else:
            raise TypeError(f"not an intervention: {iv!r}")

    def _rows(self, step, table: Tensor) -> Tensor:
        """The slice of a per-row table for the rows of the current chunk."""
        if not self.per_row:
            return table[:1].expand(step.batch_size, -1)
        stop = step.row_offset + step.batch_size
        if stop > self.n_rows:
            raise UserError(f"batch has {stop} rows but interventions were given for {self.n_rows}: "
                            "pass one intervention list per row")
        return table[step.row_offset:stop]

    def _rows3(self, step, table: Tensor) -> Tensor:
        """Per-row vectors [B, m, d] for the current chunk."""
        stop = step.row_offset + step.batch_size
        if table.shape[1] and stop > self.n_rows:
            raise UserError(f"batch has {stop} rows but interventions were given for {self.n_rows}: "
                            "pass one intervention list per row")
        return table[step.row_offset:stop]

    def hook_for(self, point):
        def hook(h: Tensor, step) -> Tensor:
            if self.record is not None and point in self.record.features:
                self._record(point, h, step)
            if point in self.add_tables:
                shared, per = self.add_tables[point]
                h = h + shared.sum(0)
                if per.shape[1]:
                    h = h + self._rows3(step, per).sum(1).unsqueeze(1)
            if point in self.features:
                h = self._features(self.features[point], h, step)
            if point in self.dir_tables:
                shared, per = self.dir_tables[point]
                for d in shared:
                    h = h - (h @ d).unsqueeze(-1) * d
                if per.shape[1]:
                    D = self._rows3(step, per)  # [B, m, d]
                    h = h - torch.einsum("btd,bmd,bme->bte", h, D, D)
            return h
        return hook

    def _features(self, lf: _LayerFeatures, h: Tensor, step) -> Tensor:
        if self.mode == "reference":
            return self._reference(lf, h, step)
        f = lf.activations(h)
        delta = None
        for pos, (mask, target, clamped) in lf.groups.items():
            m = self._rows(step, mask).unsqueeze(1) * self._position_mask(step, pos, f.dtype)
            if clamped is None:
                d = f * m
            else:
                c = self._rows(step, clamped).unsqueeze(1)
                t = self._rows(step, target).unsqueeze(1)
                d = m * (f - t * c)  # ablate: f; clamp to t: f − t
            delta = d if delta is None else delta + d
        return h - (delta @ lf.W_dec).to(h.dtype)

    def _position_mask(self, step, pos: Positions, dtype) -> Tensor:
        """[B, T, 1] position mask, computed once per forward step and shared by every layer."""
        if self._pm_step is not step:
            self._pm_step, self._pm = step, {}
        key = (pos if isinstance(pos, str) else tuple(pos), dtype)
        if key not in self._pm:
            self._pm[key] = position_mask(step, pos).unsqueeze(-1).to(dtype)
        return self._pm[key]

    def _reference(self, lf: _LayerFeatures, h: Tensor, step) -> Tensor:
        """Full SAELens encode → edit latents → decode, plus the error term."""
        sae = self.saes.saes.get(lf.fd.layer) if getattr(self.saes, "saes", None) else None
        x = h.to(lf.dtype)
        full = sae.encode(x) if sae is not None else lf.fd_dev.encode(x)
        recon = sae.decode(full) if sae is not None else lf.fd_dev.decode(full)
        edited = full.clone()
        cols = torch.tensor(lf.ids, device=h.device)
        sub = edited[..., cols]
        for pos, (mask, target, clamped) in lf.groups.items():
            pm = position_mask(step, pos).unsqueeze(-1).to(sub.dtype)
            m = self._rows(step, mask).unsqueeze(1) * pm
            new = torch.zeros_like(sub) if clamped is None else \
                self._rows(step, target).unsqueeze(1) * self._rows(step, clamped).unsqueeze(1)
            sub = sub * (1 - m) + new * m
        edited[..., cols] = sub
        out = (sae.decode(edited) if sae is not None else lf.fd_dev.decode(edited)) + (x - recon)
        return out.to(h.dtype)

    def _record(self, layer: int, h: Tensor, step) -> None:
        assert self.record is not None  # only called when recording
        ids = list(self.record.features[layer])
        fd = self.saes[layer].to(self.device, self.dtype)
        if fd.architecture == "topk":
            acts = fd.encode(h)[..., torch.tensor(ids, device=h.device)]
        else:
            acts = fd.encode_subset(h, ids)
        entry = self._entry(step)
        entry["acts"][layer] = acts.float().cpu()

    def _entry(self, step) -> dict:
        assert self.record is not None  # only called when recording
        steps = self.record.steps
        if not steps or steps[-1]["_step"] is not step:
            steps.append({"_step": step, "row_offset": step.row_offset,
                          "prompt": bool(step.is_prompt.any()) or step.prompt_len is None,
                          "token_index": step.token_index.cpu(), "acts": {}})
        return steps[-1]

    def points(self) -> set:
        pts = set(self.directions) | set(self.adds) | set(self.features)
        if self.record is not None:
            pts |= set(self.record.features)
        return pts


@contextmanager
def intervene(model: HookTarget, saes=None, shared: Sequence[Intervention] = (),
              rows: Sequence[Sequence[Intervention]] | None = None, mode: str = "sparse",
              record: Recording | None = None) -> Iterator[Intervener]:
    """Apply `shared` interventions to every row, and `rows[r]` to row r of the caller's batch
    (rows are counted across batch chunks), for every forward pass and generation step inside
    the block. `record` collects SAE activations of the named latents."""
    iv = Intervener(model, saes, list(shared), rows, mode, record)
    with model.hooks({p: iv.hook_for(p) for p in iv.points()}):
        yield iv
    if record is not None:
        for st in record.steps:
            st.pop("_step", None)
