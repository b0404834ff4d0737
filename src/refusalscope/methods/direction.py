"""The refusal direction (paper appendix "Deriving a Refusal Steering Vector"; Arditi et al.).

r(l) = mean harmful − mean harmless residual at a post-instruction position, every layer. The
layer l* is chosen on a validation split by attack success rate: cheap first-token scores (P of
the refusal token under ablation, KL on harmless prompts, refusal induced by ActAdd) rank every
candidate in one batched pass, then the best few are checked by generation + judge, since P("I")
alone can pick a layer whose ablation breaks the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..interventions.spec import ActAdd, DirectionAblation
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged, kl_divergence, refusal_probs


@dataclass
class DirectionChoice:
    layer: int
    position: int
    direction: Tensor  # unit r̂(l*)
    vector: Tensor  # unnormalised r(l*) (used for ActAdd)
    table: pd.DataFrame  # one row per candidate (position, layer)


def mean_differences(model: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                     positions: Sequence[int], batch_size: int, quiet: bool = True) -> Tensor:
    """r for every (position, layer): [P, L, d]. Positions count back from the last token (-1)."""
    depth = max(-p for p in positions)
    layers = list(range(model.n_layers))

    def means(prompts):
        res = model.residuals(model.encode(list(prompts)), layers, positions=depth,
                              batch_size=batch_size, quiet=quiet)
        return torch.stack([res[l][:, [depth + p for p in positions]].mean(0) for l in layers], 1)

    return means(harmful) - means(harmless)


def candidate_layers(n_layers: int, layers: Sequence[int] | str) -> list[int]:
    """'auto': skip the first layer and the last 20% (Arditi et al.), else the given list."""
    if layers == "auto":
        return list(range(1, max(2, int(0.8 * n_layers))))
    assert not isinstance(layers, str)  # the config allows "auto" or a list of layers
    return list(layers)


def score_candidates(model: ChatModel, diffs: Tensor, positions: Sequence[int], layers: Sequence[int],
                     val_harmful: Sequence[str], val_harmless: Sequence[str], batch_size: int,
                     quiet: bool = True, done: dict | None = None, on_row=None) -> pd.DataFrame:
    """Per candidate: mean P(refusal) on harmful prompts with r̂ ablated, and mean KL on harmless
    prompts (next-token distribution, ablated vs plain). `done` maps (position, layer) to rows
    already scored (a resumed run); `on_row(row)` is called as each new row is scored."""
    done = done or {}
    cands = [(pi, p, l) for pi, p in enumerate(positions) for l in layers]
    base_h = refusal_probs(model, None, val_harmful, batch_size=batch_size)
    base_dist = refusal_probs(model, None, val_harmless, batch_size=batch_size, full=True)
    rows = [done[(p, l)] for _, p, l in cands if (p, l) in done]
    cands = [c for c in cands if (c[1], c[2]) not in done]
    for (pi, p, l) in tqdm(cands, desc="score directions", disable=quiet):
        abl = [DirectionAblation(diffs[pi, l])]
        p_h = refusal_probs(model, None, val_harmful, shared=abl, batch_size=batch_size)
        dist = refusal_probs(model, None, val_harmless, shared=abl, batch_size=batch_size, full=True)
        rows.append({"position": p, "layer": l, "p_refusal_ablated": p_h.mean().item(),
                     "p_refusal_base": base_h.mean().item(),
                     "kl_harmless": kl_divergence(base_dist, dist).mean().item(),
                     "norm": diffs[pi, l].norm().item()})
        if on_row:
            on_row(rows[-1])
    return pd.DataFrame(rows).sort_values(["position", "layer"], ascending=[False, True]).reset_index(drop=True)


def select_direction(model: ChatModel, diffs: Tensor, positions: Sequence[int], table: pd.DataFrame,
                     val_harmful: Sequence[str], val_harmless: Sequence[str], judge: Judge,
                     max_kl: float, n_generate: int,
                     max_new_tokens: int, batch_size: int, quiet: bool = True) -> DirectionChoice:
    """Generate + judge for the n_generate candidates with the lowest ablated P(refusal) among
    those within max_kl (all candidates if none is), then take the highest ASR (lower KL on ties).
    The judged candidates also get P(refusal) on harmless prompts with r added at their layer."""
    table = table.copy()
    table["kl_ok"] = table["kl_harmless"] <= max_kl
    pool = table[table["kl_ok"]] if table["kl_ok"].any() else table
    picks = pool.sort_values("p_refusal_ablated").head(n_generate)
    table["asr_val"] = float("nan")
    table["degenerate_val"] = float("nan")
    table["p_refusal_actadd"] = float("nan")
    for idx, row in tqdm(list(picks.iterrows()), desc="judge top directions", disable=quiet):
        pi = list(positions).index(int(row["position"]))
        j = generate_judged(model, None, val_harmful, None, judge, max_new_tokens, batch_size,
                            shared=[DirectionAblation(diffs[pi, int(row["layer"])])])
        table.loc[idx, "asr_val"] = sum(j.jailbroken) / len(j)
        table.loc[idx, "degenerate_val"] = sum(j.degenerate) / len(j)
        add = [ActAdd(diffs[pi, int(row["layer"])], int(row["layer"]))]
        table.loc[idx, "p_refusal_actadd"] = refusal_probs(
            model, None, val_harmless, shared=add, batch_size=batch_size).mean().item()
    judged = table.dropna(subset=["asr_val"]).sort_values(["asr_val", "kl_harmless"],
                                                           ascending=[False, True])
    best = judged.iloc[0]
    pi, layer = list(positions).index(int(best["position"])), int(best["layer"])
    table["selected"] = (table["position"] == best["position"]) & (table["layer"] == layer)
    vec = diffs[pi, layer]
    return DirectionChoice(layer, int(best["position"]), vec / vec.norm(), vec, table)


def cosine_profile(model: ChatModel, prompts: Sequence[str], direction: Tensor, batch_size: int) -> Tensor:
    """cos(h_l(last token), r̂) for every layer: [n_prompts, L] (paper Figs 4/5)."""
    layers = list(range(model.n_layers))
    res = model.residuals(model.encode(list(prompts)), layers, positions=1, batch_size=batch_size)
    h = torch.stack([res[l][:, -1] for l in layers], 1)  # [n, L, d]
    return torch.nn.functional.cosine_similarity(h, direction.view(1, 1, -1).float(), dim=-1)
