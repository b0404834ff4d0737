"""Stage 1: per layer, the SAE latents whose decoder rows align with the refusal direction; per
prompt, the smallest K (10, 20, …) whose top-K-per-layer ablation jailbreaks it.

The K ladder is evaluated in batches of rungs across all prompts still refusing, so a prompt that
breaks at K=20 costs two rungs, and the answer equals the sequential search's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor
from tqdm.auto import tqdm

from ..interventions.spec import FeatureAblation
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged


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


def top_k_set(ranked: dict[int, Tensor], k: int) -> dict[int, list[int]]:
    return {l: r[:k].tolist() for l, r in ranked.items()}


def ladder(start: int, step: int, k_max: int) -> list[int]:
    return list(range(start, k_max + 1, step))


@dataclass
class Stage1Result:
    prompt_id: str
    k: int | None  # smallest jailbreaking K, None if none up to k_max
    tried: list[int] = field(default_factory=list)
    completions: dict = field(default_factory=dict)  # K -> completion
    verdicts: dict = field(default_factory=dict)  # K -> {"refused", "degenerate", "jailbroken"}


def search_k(model: ChatModel, saes, prompts: Sequence[tuple[str, str]], ranked: dict[int, Tensor],
             ks: Sequence[int], judge: Judge, max_new_tokens: int, batch_size: int, rungs_per_round: int = 3,
             positions="all", quiet: bool = False, on_done=None) -> list[Stage1Result]:
    """Smallest K per (id, text) prompt. `on_done(result)` is called as each prompt finishes
    (for checkpointing)."""
    results = {pid: Stage1Result(pid, None) for pid, _ in prompts}
    open_ = list(prompts)
    plans_by_k = {k: FeatureAblation(top_k_set(ranked, k), positions) for k in ks}
    bar = tqdm(total=len(prompts), desc="stage 1 (K ladder)", disable=quiet)
    for start in range(0, len(ks), rungs_per_round):
        rungs = list(ks[start:start + rungs_per_round])
        rows = [(pid, text, k) for pid, text in open_ for k in rungs]
        if not rows:
            break
        j = generate_judged(model, saes, [t for _, t, _ in rows], [[plans_by_k[k]] for *_, k in rows],
                            judge, max_new_tokens, batch_size)
        for (pid, _, k), comp, ref, deg, jb in zip(rows, j.completions, j.refused, j.degenerate, j.jailbroken):
            r = results[pid]
            r.tried.append(k)
            r.completions[k] = comp
            r.verdicts[k] = {"refused": ref, "degenerate": deg, "jailbroken": jb}
        still = []
        for pid, text in open_:
            r = results[pid]
            hit = [k for k in rungs if r.verdicts[k]["jailbroken"]]
            if hit or rungs[-1] == ks[-1]:
                r.k = min(hit) if hit else None
                r.tried = [k for k in r.tried if r.k is None or k <= r.k]
                bar.update(1)
                if on_done:
                    on_done(r)
            else:
                still.append((pid, text))
        open_ = still
    bar.close()
    return [results[pid] for pid, _ in prompts]
