"""Stage 1: per layer, the SAE latents whose decoder rows align with the refusal direction; per
prompt, the smallest K (10, 20, …) whose top-K-per-layer ablation jailbreaks it (the shared
K ladder of `ladder.py`, with one plan per K shared by every prompt)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from torch import Tensor

from ..interventions.features import FeatureSet
from ..io.model import ChatModel
from ..measures.judges import Judge
from .ladder import ladder, ladder_search
from .records import LadderRecord

__all__ = ["aligned_latents", "ladder", "search_k", "top_k_set"]


def aligned_latents(saes, direction: Tensor, layers: Sequence[int],
                    k_max: int) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per layer, the k_max latent indices with the largest cos(r̂, W_dec[i]) (descending), and
    those cosines."""
    ranked, cosines = {}, {}
    for layer in layers:
        fd = saes[layer]
        cos = fd.unit_decoder().float() @ (direction.float() / direction.norm()).to(fd.W_dec.device)
        vals, idx = cos.topk(min(k_max, fd.d_sae))
        ranked[layer], cosines[layer] = idx.cpu(), vals.cpu()
    return ranked, cosines


def top_k_set(ranked: dict[int, Tensor], k: int) -> FeatureSet:
    """The top-k latents of every ranked layer (the paper's candidate set L_K)."""
    return FeatureSet.from_layers({l: r[:k].tolist() for l, r in ranked.items()})


def search_k(model: ChatModel, saes, prompts: Sequence[tuple[Hashable, str]], ranked: dict[int, Tensor],
             ks: Sequence[int], judge: Judge, max_new_tokens: int, batch_size: int, rungs_per_round: int = 3,
             positions="all", quiet: bool = False, on_done=None) -> list[LadderRecord]:
    """Smallest K per (id, text) prompt. `on_done(record)` is called as each prompt finishes."""
    plans = {k: top_k_set(ranked, k).plan(positions) for k in ks}
    return ladder_search(model, saes, prompts, ks, lambda pid, k: plans[k], judge, max_new_tokens,
                         batch_size, rungs_per_round, quiet, on_done, "stage 1 (K ladder)")
