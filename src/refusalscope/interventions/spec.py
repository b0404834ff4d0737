"""Interventions as plain data. Nothing here touches a model; `engine.intervene` applies them.

Features are addressed as (layer, index); the paper writes them "layer-index".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

Positions = str | tuple[int, ...]  # "all" | "prompt" | "generated" | token indices (0 = BOS)


def _positions(p) -> Positions:
    if isinstance(p, str):
        if p not in ("all", "prompt", "generated"):
            raise ValueError(f"positions must be all, prompt, generated or token indices, not {p!r}")
        return p
    return tuple(int(i) for i in p)


@dataclass(frozen=True, eq=False)
class DirectionAblation:
    """Project the unit direction out of the stream entering layer 0 and every layer's output
    (Arditi et al.), or only at `layers` when given."""

    direction: Tensor
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        d = self.direction.detach().float()
        object.__setattr__(self, "direction", d / d.norm().clamp_min(1e-12))


@dataclass(frozen=True, eq=False)
class ActAdd:
    """Add `vector` to the output of `layer` at every position (induces refusal when the vector
    is the unnormalised difference in means)."""

    vector: Tensor
    layer: int


@dataclass(frozen=True, eq=False)
class FeatureAblation:
    """Zero-ablate SAE latents keeping the error term: h̃ = h − Σ_{i∈S} f_i(h)·W_dec[i]."""

    features: Mapping[int, tuple[int, ...]]
    positions: Positions = "all"

    def __post_init__(self):
        feats = {int(l): tuple(sorted({int(i) for i in ids})) for l, ids in self.features.items()}
        object.__setattr__(self, "features", {l: v for l, v in sorted(feats.items()) if v})
        object.__setattr__(self, "positions", _positions(self.positions))

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.features.values())


@dataclass(frozen=True, eq=False)
class FeatureClamp:
    """Set SAE latents to fixed values (error term kept): h̃ = h + Σ_i (v_i − f_i(h))·W_dec[i]."""

    values: Mapping[int, Mapping[int, float]]
    positions: Positions = (0,)

    def __post_init__(self):
        vals = {int(l): {int(i): float(v) for i, v in d.items()} for l, d in self.values.items()}
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "positions", _positions(self.positions))


@dataclass(frozen=True, eq=False)
class RowAblations:
    """Many rows' feature ablations as arrays, for a batch whose rows each ablate their own
    large set (Stage 2's states): per layer, row r ablates latent i for every j with
    rows[j] = r, ids[j] = i (rows counted across batch chunks, as `intervene(rows=...)` counts
    them). Pass it as a shared intervention; it costs array writes, not one tuple per latent."""

    features: Mapping[int, tuple[np.ndarray, np.ndarray]]  # layer -> (rows, ids), int64
    positions: Positions = "all"

    def __post_init__(self):
        feats = {int(l): (np.asarray(r, dtype=np.int64), np.asarray(i, dtype=np.int64))
                 for l, (r, i) in self.features.items()}
        if any(len(r) != len(i) for r, i in feats.values()):
            raise ValueError("RowAblations needs one row number per latent id")
        object.__setattr__(self, "features", {l: v for l, v in sorted(feats.items()) if len(v[0])})
        object.__setattr__(self, "positions", _positions(self.positions))


Intervention = DirectionAblation | ActAdd | FeatureAblation | FeatureClamp | RowAblations


@dataclass
class Recording:
    """SAE activations recorded under interventions, before the layer's own ablation (what the
    latents compute from the stream they see). One `steps` entry per forward chunk:
    {"row_offset", "prompt": bool (a plain forward or generation's first step), "token_index"
    [B, T], "acts": {layer: [B, T, n_ids]}}."""

    features: Mapping[int, Sequence[int]]
    steps: list[dict] = field(default_factory=list)

    def max_activation(self, n_rows: int, prompt_only: bool = True) -> dict[int, Tensor]:
        """Per layer, [n_rows, n_ids]: the largest activation of each latent over each row's
        tokens (prompt tokens only by default)."""
        out = {l: torch.zeros(n_rows, len(ids)) for l, ids in self.features.items()}
        for st in self.steps:
            if prompt_only and not st["prompt"]:
                continue
            valid = (st["token_index"] >= 0).unsqueeze(-1)
            for layer, a in st["acts"].items():
                best = torch.where(valid, a, torch.zeros_like(a)).amax(dim=1)
                rows = slice(st["row_offset"], st["row_offset"] + a.shape[0])
                out[layer][rows] = torch.maximum(out[layer][rows], best)
        return out

    def prompt_activations(self) -> list[dict]:
        """The prompt-step entries (token positions intact), for per-token analyses. A chunk that
        ran out of memory is run again in halves (`io.oom`): only the last entries of a row count."""
        entries = [st for st in self.steps if st["prompt"]]
        last = {}
        for i, st in enumerate(entries):
            for r in range(st["row_offset"], st["row_offset"] + st["token_index"].shape[0]):
                last[r] = i
        keep = set(last.values())
        return [st for i, st in enumerate(entries) if i in keep]
