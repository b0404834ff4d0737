"""Residual states the pipeline creates and clean text never shows: extra corpus for the demo SAEs.

An SAE trained only on clean activations has no latent for the state a model is in once its
refusal latents are ablated, so a latent that is silent on a prompt and wakes up when the others
are removed (the paper's "hydra" latents) needs a dictionary that has seen such states. Gemma
Scope sees them among billions of varied tokens; the demo's 85k clean tokens do not. The build
therefore replays harmful training conversations with the refusal direction (difference in means
per layer, as the ReFAT fine-tune uses) projected out of every layer from `first` up to a layer
drawn per batch, and adds those activations to each layer's SAE training set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from ..io.model import ChatModel
from .corpus import collect


@torch.no_grad()
def layer_directions(model: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                     layers: Sequence[int], batch_size: int = 32) -> dict[int, Tensor]:
    """Unit difference in means (harmful - harmless) of the stream after each layer at the last
    prompt token of chat-formatted instructions."""
    def mean(texts):
        res = model.residuals(model.encode(list(texts)), list(layers), positions=1, batch_size=batch_size)
        return {l: res[l][:, -1].float().mean(0) for l in layers}

    h, b = mean(harmful), mean(harmless)
    return {l: (d := h[l] - b[l]) / d.norm().clamp_min(1e-8) for l in layers}


def ablated_activations(model: ChatModel, texts: Sequence[str], layers: Sequence[int],
                        directions: dict[int, Tensor], max_tokens: int, seed: int,
                        quiet: bool = True) -> dict[int, Tensor]:
    """`collect` over `texts` with each batch's stream having its direction projected out after
    every layer of `directions` up to a seeded random one (at every position)."""
    ablatable = sorted(directions)
    rng = random.Random(f"{seed}/ablated-states")
    tops = [rng.choice(ablatable) for _ in range(len(texts))]  # one draw per possible batch

    def project(r: Tensor):
        def fn(h, step):
            r_ = r.to(h.device, h.dtype)
            return h - (h @ r_).unsqueeze(-1) * r_
        return fn

    def hooks(i: int) -> dict:
        return {l: project(directions[l]) for l in ablatable if l <= tops[i]}

    return collect(model, texts, layers, max_tokens, seed + 1, quiet=quiet, hooks=hooks,
                   desc="collect ablated activations")
