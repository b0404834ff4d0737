"""What a latent writes, read from the weights alone: its top and bottom logit effects
(W_dec[i]·W_U), its decoder's cosine to the refusal direction, and its FM neighbours.

At the paper's width (65k latents, Gemma's 256k vocabulary) a dense [latents x vocab] matrix per
layer is tens of GB, so the effects are computed where the model is, a chunk of latents at a
time, and only the top/bottom k leave the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..interventions.features import Feature, FeatureSet

CHUNK = 256  # latents per [chunk x vocab] product: 256 x 256k x 4 B = 262 MB at Gemma's vocabulary


def logit_effects(model, saes, features: Iterable, k: int = 10,
                  chunk: int = CHUNK) -> dict[Feature, tuple[list, list]]:
    """Per latent, the `k` tokens whose logits its decoder row raises most and lowers most
    (W_dec[i]·W_U, the direct path, final norm ignored as in SAEDashboard). Ranked in the
    model's dtype on its device, chunk by chunk; the values shown are recomputed in fp32."""
    W_U = model.hf.get_output_embeddings().weight.detach()  # [V, d], where the model is
    tok = model.tokenizer
    out = {}
    for l, ix in FeatureSet(features).by_layer().items():
        for c0 in range(0, len(ix), chunk):
            cols = ix[c0:c0 + chunk]
            W = saes[l].W_dec[torch.as_tensor(cols, device=saes[l].device)].detach().to(W_U.device)
            eff = W.to(W_U.dtype) @ W_U.T  # [c, V]
            kk = min(k, eff.shape[1])
            top = eff.topk(kk, dim=1).indices
            bot = (-eff).topk(kk, dim=1).indices
            del eff
            Wf = W.float()
            # exact fp32 values of only the chosen tokens: [c, k] each
            v_top = torch.einsum("cd,ckd->ck", Wf, W_U[top].float()).cpu()
            v_bot = torch.einsum("cd,ckd->ck", Wf, W_U[bot].float()).cpu()
            top, bot = top.cpu(), bot.cpu()
            for j, i in enumerate(cols):
                ts, bs = _ordered(top[j], v_top[j], True), _ordered(bot[j], v_bot[j], False)
                out[Feature(l, i)] = ([(tok.decode([t]), round(v, 4)) for t, v in ts],
                                      [(tok.decode([t]), round(v, 4)) for t, v in bs])
    return out


def _ordered(ids: torch.Tensor, vals: torch.Tensor, descending: bool) -> list[tuple[int, float]]:
    pairs = [(int(t), float(v)) for t, v in zip(ids, vals)]
    return sorted(pairs, key=lambda p: (-p[1] if descending else p[1], p[0]))


def decoder_cosines(saes, features: Iterable, direction: torch.Tensor,
                    chunk: int = 4096) -> dict[Feature, float]:
    """cos(W_dec[i], r̂) per latent: how far the latent writes along the refusal direction."""
    out = {}
    for l, ix in FeatureSet(features).by_layer().items():
        r = direction.detach().float().to(saes[l].device)
        r = r / r.norm().clamp_min(1e-12)
        for c0 in range(0, len(ix), chunk):
            cols = ix[c0:c0 + chunk]
            W = saes[l].W_dec[torch.as_tensor(cols, device=saes[l].device)].detach().float()
            cos = ((W @ r) / W.norm(dim=1).clamp_min(1e-12)).cpu()
            out.update({Feature(l, i): round(float(c), 4) for i, c in zip(cols, cos)})
    return out


def fm_neighbours(
    V: torch.Tensor, columns: Sequence, features: Iterable, k: int = 10, chunk: int = 1024
) -> dict[Feature, list[tuple[str, float]]]:
    """Per latent that is an FM column, the `k` columns whose FM embeddings are most similar
    (cosine): the latents the factorization machine sees it interact with. A chunk of latents
    at a time against every column ([chunk x columns], never [latents x columns])."""
    cols = [Feature.of(c) for c in columns]
    at = {f: j for j, f in enumerate(cols)}
    U = V.detach().float()
    U = U / U.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = [f for f in FeatureSet(features) if f in at]
    kk = min(k, len(cols) - 1)
    out: dict[Feature, list[tuple[str, float]]] = {f: [] for f in rows}
    if kk <= 0:
        return out
    for c0 in range(0, len(rows), chunk):
        part = rows[c0:c0 + chunk]
        idx = torch.tensor([at[f] for f in part])
        sims = U[idx] @ U.T  # [chunk, columns]
        sims[torch.arange(len(part)), idx] = -2.0  # never its own neighbour
        top = sims.topk(kk, dim=1)
        for j, f in enumerate(part):
            out[f] = [(cols[int(c)].id, round(float(s), 4)) for s, c in zip(top.values[j], top.indices[j])]
    return out
