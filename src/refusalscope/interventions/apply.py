"""`rs.apply`: the engine's interventions on a plain transformers model, for any generate loop.

A researcher's own `model(...)`, `model.generate(...)` or evaluation harness runs inside the
block with the same hooks as refusalscope's passes (the engine's `Intervener`, not a copy of its
math): feature ablation keeps the SAE error term and applies at every position, generated tokens
included, and padding is never edited. Positions "prompt" / "generated" are told apart by the KV
cache (a pass with no past tokens is a prompt), as `model.generate` runs by default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import UserError
from ..io.hooks import HookFn, HookPoint, StreamHooks
from ..io.saes import FeatureDictionary, SAESet
from .engine import Intervener
from .features import FeatureSet
from .spec import ActAdd, DirectionAblation, FeatureAblation, FeatureClamp, Intervention

_KINDS = (DirectionAblation, ActAdd, FeatureAblation, FeatureClamp)


class _PlainModel:
    """The engine's view (`engine.HookTarget`) of a transformers causal LM, with its own step
    tracker that is removed when the block ends."""

    def __init__(self, hf: Any):
        decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if decoder is None or layers is None:
            raise UserError(f"{type(hf).__name__} is not a decoder-only transformers model with "
                            "decoder.layers: pass an AutoModelForCausalLM model (Llama, Gemma-2, ...)")
        self.hf, self.layers = hf, layers
        self._hooks = StreamHooks(decoder, layers, auto_prompt=True)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def d_model(self) -> int:
        return int(self.hf.config.get_text_config().hidden_size)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @contextmanager
    def hooks(self, fns: dict[HookPoint, HookFn | list[HookFn]] | None = None) -> Iterator[None]:
        lists = {k: (v if isinstance(v, list) else [v]) for k, v in (fns or {}).items()}
        with self._hooks.installed(lists):
            yield

    def close(self) -> None:
        self._hooks.close()


def as_sae_set(saes: Any) -> SAESet | None:
    """An SAESet from an SAESet, a {layer: SAELens SAE or FeatureDictionary} mapping, or a list
    of SAELens SAEs (each names its layer in its hook name)."""
    if saes is None or isinstance(saes, SAESet):
        return saes
    items = saes.items() if isinstance(saes, Mapping) else [(None, s) for s in saes]
    dicts: dict[int, FeatureDictionary] = {}
    objs: dict[int, Any] = {}
    for layer, sae in items:
        if isinstance(sae, FeatureDictionary):
            fd = sae
        elif hasattr(sae, "cfg") and hasattr(sae, "W_dec"):
            fd = FeatureDictionary.from_sae(sae, layer)
            objs[fd.layer] = sae
        else:
            raise UserError(f"not an SAE: {type(sae).__name__}: pass SAELens SAEs, an SAESet or "
                            "{layer: SAE}")
        dicts[fd.layer] = fd
    return SAESet(dicts, objs)


def as_interventions(intervention: Any) -> list[Intervention]:
    """Interventions from one, a list of them, a refusal direction (a tensor: projected out at
    every layer) or a set of latents (anything `FeatureSet` reads: zero-ablated everywhere)."""
    if isinstance(intervention, _KINDS):
        return [intervention]
    if isinstance(intervention, torch.Tensor):
        if intervention.dim() != 1:
            raise UserError(f"a direction must be one vector, got shape {tuple(intervention.shape)}: "
                            "pass the refusal direction [d_model]")
        return [DirectionAblation(intervention)]
    if isinstance(intervention, (str, bytes, os.PathLike)):
        raise UserError(f"cannot apply {intervention!r}: pass interventions, a direction tensor or a "
                        "FeatureSet")
    items = list(intervention) if isinstance(intervention, Iterable) else None
    if items is None:
        raise UserError(f"cannot apply a {type(intervention).__name__}: pass interventions, a direction "
                        "tensor or a FeatureSet")
    if items and all(isinstance(i, _KINDS) for i in items):
        return items
    return FeatureSet(items).plan()


@contextmanager
def apply(model: Any, intervention: Any, saes: Any = None, *, mode: str = "sparse") -> Iterator[Any]:
    """Run `model` (a transformers causal LM, or a refusalscope ChatModel) with `intervention`
    inside the block: a FeatureSet / latent ids (zero-ablated at every position; needs `saes`),
    a direction tensor (projected out of every layer), one `Intervention` or a list of them.
    `saes`: an SAESet, SAELens SAEs (list, or {layer: SAE}). Yields the model."""
    hf = getattr(model, "hf", model)  # a ChatModel carries the transformers model
    plan = as_interventions(intervention)
    sae_set = as_sae_set(saes)
    target = _PlainModel(hf)
    try:
        if sae_set is not None:
            sae_set.check_against(target.d_model, target.n_layers)
        iv = Intervener(target, sae_set, plan, None, mode, None)
        with target.hooks({p: iv.hook_for(p) for p in iv.points()}):
            yield model
    finally:
        target.close()
