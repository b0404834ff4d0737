"""The SAELens bundle read back: `load_bundle(path)` gives the sets, the SAE of every layer (release +
sae_id or folder) and the intervention, and applies it as TransformerLens / SAELens hooks or as
refusalscope interventions (`rs.apply`).

The bundle carries, per layer, the encoder columns, thresholds and decoder rows of its latents, so a
JumpReLU or ReLU SAE needs nothing else: with the error term kept, h̃ = h − Σ_{i∈S} (f_i(h) − t_i)·W_dec[i]
(t_i = 0: ablate, v: clamp, s·f_i: scale), exactly what refusalscope's engine does. A TopK SAE decides
membership from every latent, so its hooks need the full SAE (`saes=`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..interventions.features import FeatureSet
from ..interventions.spec import FeatureAblation, Intervention, Positions
from ..io.saes import FeatureDictionary

FORMAT = "refusalscope.saelens-bundle"
VERSION = 1


@dataclass(frozen=True)
class Action:
    """What happens to each latent of the set: ablate (→ 0), clamp (→ value) or scale (→ value · f)."""

    kind: str = "ablate"
    value: float | None = None
    positions: Positions = "all"

    @classmethod
    def parse(cls, text: str, positions: Positions | None = None) -> Action:
        """From the CLI's `ablate`, `clamp=V` or `scale=S`."""
        kind, _, value = text.partition("=")
        if kind == "ablate" and not value:
            return cls("ablate", None, positions or "all")
        try:
            v = float(value)
        except ValueError:
            v = None
        if kind not in ("clamp", "scale") or v is None:
            raise UserError(f"bad intervention {text!r}: use ablate, clamp=VALUE or scale=FACTOR")
        return cls(kind, v, positions or ((0,) if kind == "clamp" else "all"))

    def to_json(self) -> dict:
        pos = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"kind": self.kind, "value": self.value, "positions": pos}

    @classmethod
    def from_json(cls, d: Mapping) -> Action:
        pos = d.get("positions", "all")
        return cls(d["kind"], d.get("value"), pos if isinstance(pos, str) else tuple(int(p) for p in pos))

    def target(self, f: torch.Tensor) -> torch.Tensor:
        """The latents' new values given their activations `f`."""
        if self.kind == "ablate":
            return torch.zeros_like(f)
        if self.kind == "clamp":
            return torch.full_like(f, float(self.value or 0.0))
        return f * float(self.value if self.value is not None else 1.0)


@dataclass
class Bundle:
    """A loaded bundle: `sets` {name: FeatureSet}, `saes` {layer: SAE identity}, `action`, and
    per layer the sliced SAE (a FeatureDictionary over the bundle's latents of that layer, whose
    column j is latent `indices[layer][j]`; a TopK layer's slice is only its decoder's)."""

    meta: dict
    sets: dict[str, FeatureSet]
    saes: dict[int, dict]
    action: Action
    slices: dict[int, FeatureDictionary]
    indices: dict[int, list[int]]

    def set(self, name: str | None = None) -> FeatureSet:
        """The set called `name`; without a name, the bundle's only set."""
        if name is None:
            if len(self.sets) != 1:
                raise UserError(f"the bundle holds {len(self.sets)} sets: name one of "
                                f"{', '.join(list(self.sets)[:5])}{', …' if len(self.sets) > 5 else ''}")
            return next(iter(self.sets.values()))
        if name not in self.sets:
            raise UserError(f"the bundle has no set {name!r}: use one of {', '.join(list(self.sets)[:5])}")
        return self.sets[name]

    def sae_specs(self) -> dict[int, dict]:
        """Per layer, what `refusalscope.io.sae_loading.load_sae` (or SAELens) loads: release +
        sae_id, or path."""
        return {l: {k: v for k, v in s.items() if k in ("release", "sae_id", "path")} for l, s in self.saes.items()}

    def interventions(self, name: str | None = None) -> list[Intervention]:
        """The set's intervention as refusalscope data (what `rs.apply` and the engine take).
        Scale has no engine form: a one-line error says so."""
        fs = self.set(name)
        if self.action.kind == "ablate":
            return [FeatureAblation({l: tuple(v) for l, v in fs.by_layer().items()}, self.action.positions)]
        if self.action.kind == "clamp":
            return [fs.clamp(float(self.action.value or 0.0), self.action.positions)]
        raise UserError("a scale bundle has no refusalscope engine form: apply it with Bundle.tl_hooks()")

    def tl_hooks(self, name: str | None = None, saes: Mapping[int, Any] | None = None
                 ) -> list[tuple[str, Callable]]:
        """[(hook_name, fn)] for TransformerLens `run_with_hooks(fwd_hooks=...)` / `model.hooks(...)`
        (and SAELens's HookedSAETransformer): the set's intervention at blocks.L.hook_resid_post with
        the error term kept. `saes` ({layer: SAELens SAE}) is needed for TopK SAEs only."""
        out = []
        for layer, ids in self.set(name).by_layer().items():
            out.append((self.saes[layer]["hook_name"], self._hook(layer, ids, (saes or {}).get(layer))))
        return out

    def _hook(self, layer: int, ids: list[int], sae: Any) -> Callable:
        fd = self.slices[layer]
        cols = [self.indices[layer].index(i) for i in ids]
        W_dec = fd.W_dec[cols]
        if self.saes[layer]["architecture"] == "topk" and sae is None:
            raise UserError(f"layer {layer}'s SAE is TopK: pass saes={{{layer}: sae}} (load it as "
                            f"{self.sae_specs()[layer]})")
        action = self.action

        def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
            x = act.to(fd.dtype)
            f = sae.encode(x)[..., ids] if sae is not None else fd.encode_subset(x, cols)
            delta = f - action.target(f)
            mask = _positions_mask(act.shape[:-1], action.positions, act.device).to(delta.dtype)
            return act - ((delta * mask) @ W_dec.to(act.device)).to(act.dtype)
        return hook


def _positions_mask(shape: torch.Size, positions: Positions, device) -> torch.Tensor:
    """[B, T, 1]: which token positions of the sequence passed the action applies to."""
    if positions == "all" or positions == "generated":
        return torch.ones(*shape, 1, device=device)
    if positions == "prompt":
        raise UserError("positions 'prompt' need the prompt length: use rs.apply, or pass token indices")
    keep = torch.zeros(shape[-1], device=device)
    idx = [int(p) for p in positions if int(p) < shape[-1]]
    keep[idx] = 1.0
    return keep.expand(*shape).unsqueeze(-1)


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle folder (bundle.json + bundle.safetensors) written by `refusalscope export --to saelens`."""
    root = Path(path)
    meta_path = root / "bundle.json" if root.is_dir() else root
    if not meta_path.exists():
        raise UserError(f"{root} holds no bundle.json: pass a folder written by refusalscope export --to saelens")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{meta_path} is not valid JSON ({err}): export the bundle again") from None
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise UserError(f"{meta_path} is not a version-{VERSION} {FORMAT}: export the bundle again")
    from safetensors.torch import load_file

    t = load_file(str(meta_path.parent / meta["tensors"]))
    saes = {int(l): s for l, s in meta["saes"].items()}
    slices, indices = {}, {}
    for layer, s in saes.items():
        indices[layer] = t[f"indices.{layer}"].tolist()
        slices[layer] = FeatureDictionary(
            layer=layer, hook_name=s["hook_name"], W_enc=t[f"W_enc.{layer}"],
            W_dec=t[f"W_dec.{layer}"], b_enc=t[f"b_enc.{layer}"], b_dec=t[f"b_dec.{layer}"],
            threshold=t[f"threshold.{layer}"], architecture="jumprelu" if s["architecture"] == "jumprelu" else "relu",
            apply_b_dec_to_input=bool(s["apply_b_dec_to_input"]))
    sets = {s["name"]: FeatureSet((f["layer"], f["index"]) for f in s["features"]) for s in meta["sets"]}
    return Bundle(meta, sets, saes, Action.from_json(meta["intervention"]), slices, indices)
