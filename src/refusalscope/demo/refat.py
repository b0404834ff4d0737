"""Refusal-feature adversarial training (ReFAT, Yu et al. 2024) for the demo fine-tune.

A model refuses redundantly when it has learnt to keep refusing while part of its refusal
mechanism is removed. ReFAT removes it during training: the refusal direction (difference in
means of harmful and harmless streams at the decision token, recomputed from the model being
trained) is projected out of harmful examples' streams at a random subset of the trained layers,
and the loss still asks for the refusal. This is what should give the demo model prompts whose
refusal survives the ablation of its active refusal latents, and dormant latents that wake up
when those are gone (the paper's "hydra" finding).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import contextmanager

import torch


@torch.no_grad()
def refusal_directions(hf, items, layers: Sequence[int], batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Unit difference-in-means direction per layer (output of that decoder layer) at each
    example's decision position (the last prompt token); `items` as finetune._tokenize gives."""
    dec = hf.get_decoder()
    sums = {h: {l: torch.zeros(hf.config.hidden_size) for l in layers} for h in (True, False)}
    counts = {True: 0, False: 0}
    grab: dict[int, torch.Tensor] = {}
    handles = [dec.layers[l].register_forward_hook(
        lambda m, a, o, l=l: grab.__setitem__(l, o[0] if isinstance(o, tuple) else o)) for l in layers]
    was_training = hf.training
    hf.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = max(n for _, n, _, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (seq, n, _, _) in enumerate(chunk):  # the prompt only, right-padded
                ids[row, :n] = torch.tensor(seq[:n])
            dec(input_ids=ids, use_cache=False)
            for row, (_, n, _, harmful) in enumerate(chunk):
                counts[harmful] += 1
                for l in layers:
                    sums[harmful][l] += grab[l][row, n - 1].float()
    finally:
        for h in handles:
            h.remove()
        hf.train(was_training)
    if not counts[True] or not counts[False]:
        return {}
    out = {}
    for l in layers:
        d = sums[True][l] / counts[True] - sums[False][l] / counts[False]
        out[l] = d / d.norm().clamp_min(1e-8)
    return out


def draw(rng: random.Random, harmful: Sequence[bool], layers: Sequence[int], prob: float,
         layer_prob: float) -> tuple[list[int], list[int]]:
    """One batch's ReFAT choice: harmful rows ablated (each with `prob`) and the layers ablated
    (each with `layer_prob`, at least one)."""
    rows = [i for i, h in enumerate(harmful) if h and rng.random() < prob]
    chosen = [l for l in layers if rng.random() < layer_prob] or [rng.choice(list(layers))]
    return rows, chosen


@contextmanager
def ablating(hf, directions: dict[int, torch.Tensor], layers: Sequence[int], rows: Sequence[int]):
    """Project each direction out of the chosen rows' streams after its layer, at every position."""
    if not rows or not layers:
        yield
        return
    dec = hf.get_decoder()
    idx = torch.tensor(list(rows))

    def hook(m, a, o, r: torch.Tensor):
        h = o[0] if isinstance(o, tuple) else o
        r = r.to(h.dtype)
        sel = h[idx]
        h = h.index_copy(0, idx, sel - (sel @ r).unsqueeze(-1) * r)
        return (h, *o[1:]) if isinstance(o, tuple) else h

    handles = [dec.layers[l].register_forward_hook(lambda m, a, o, r=directions[l]: hook(m, a, o, r))
               for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
