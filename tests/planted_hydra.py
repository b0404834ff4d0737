"""The planted tiny world with redundant refusal: a dormant "hydra" latent that wakes up when the
active refusal latents are ablated, so the pipeline's hydra analysis has something to find.

On top of tests/planted.py (refusal along r̂_l, read by the "I" logit; latents along r̂_l at
layers 0-2), layer 3's MLP gets a repair neuron: it is silent on every token of the clean
prompts and fires at the last token when r̂ has been taken out upstream, writing a backup
direction v = cos θ·â + sin θ·v⊥ (â along r̂_1 + r̂_2, v⊥ orthogonal to every clean last-token
stream), and "I" also reads v⊥. Layer 3's SAE has no r̂ latent, but latent HYDRA reads v⊥ and
writes v: silent on the clean prompts, awake when the repair fires. Ablating the active latents
alone then leaves the refusal in place (the repair restores it); ablating HYDRA too jailbreaks.
"""

from __future__ import annotations

import math

import torch
from planted import HARMFUL, HARMLESS, plant_model, planted_weights, sae_set

from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import FeatureAblation
from refusalscope.io.model import ChatModel

LAYERS = (0, 1, 2, 3)
REPAIR_LAYER = 3
HYDRA = 5  # the dormant latent's index in layer 3's SAE
NEURON = 0  # the repair neuron's index in layer 3's MLP
HYDRA_ID = f"{REPAIR_LAYER}-{HYDRA}"


def _mlp_inputs(model: ChatModel, saes, prompts, shared=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 3 MLP inputs [B, T, d] and the real-token mask, under `shared` interventions."""
    got: list[torch.Tensor] = []
    mlp = model.hf.model.layers[REPAIR_LAYER].mlp
    handle = mlp.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))
    batch = model.encode(list(prompts))
    try:
        with intervene(model, saes, shared=shared):
            model.next_token_probs(batch)
    finally:
        handle.remove()
    return got[0], batch.attention_mask.bool()


def _separator(neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """g with g·x < 0 on `neg` rows and > 0 on `pos` rows (a linear SVM through the origin:
    the MLP has no bias), scaled so that min over `pos` of g·x is 1."""
    import numpy as np
    from sklearn.svm import LinearSVC

    X = torch.cat([neg, pos]).numpy()
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    clf = LinearSVC(C=100.0, fit_intercept=False, max_iter=100_000, class_weight="balanced",
                    random_state=0).fit(X, y)
    g = torch.tensor(clf.coef_[0], dtype=torch.float32)
    if (neg @ g).max() >= 0 or (pos @ g).min() <= 0:
        raise RuntimeError("the repair neuron's states are not linearly separable")
    return g / (pos @ g).min()


@torch.no_grad()
def hydra_world(seed: int = 0, m: int = 128, theta: float = math.pi / 4, gain: float = 12.0,
                strength: float = 10.0):
    """(model, SAEs) of the world above. `theta`: angle of v from â (cos θ is what Stage 1 ranks
    latent HYDRA by); `strength`: the repair's size in units of |r_3|; `gain`: how hard "I" reads v⊥."""
    model, diffs = plant_model(seed)
    hf, d = model.hf, model.d_model
    g = torch.Generator().manual_seed(seed + 1)
    weights = {l: planted_weights(d, m, diffs[l] if l < REPAIR_LAYER else None, 3, g) for l in LAYERS}
    saes = sae_set(weights, d)
    r_hat = {l: diffs[l] / diffs[l].norm() for l in LAYERS}
    # v⊥: orthogonal to â, every r̂_l and every clean last-token stream at the end of the model
    a = r_hat[1] + r_hat[2]
    a = a / a.norm()
    last = model.residuals(model.encode(HARMFUL + HARMLESS), [REPAIR_LAYER], positions=1)[REPAIR_LAYER][:, -1]
    basis = torch.linalg.qr(torch.stack([a, *r_hat.values(), *last]).T).Q  # [d, k]
    v_perp = torch.randn(d, generator=g)
    v_perp = v_perp - basis @ (basis.T @ v_perp)
    v_perp = v_perp / v_perp.norm()
    v = math.cos(theta) * a + math.sin(theta) * v_perp
    # the repair neuron: off on every clean token, on at the last token once r̂ is gone upstream
    clean = [_mlp_inputs(model, saes, ps) for ps in (HARMFUL, HARMLESS)]
    neg = torch.cat([x[mask] for x, mask in clean])
    ablations = [{1: (0,)}, {2: (0,)}, {1: (0,), 2: (0,)}, {1: (0, 1, 2)}, {1: (0, 3, 4), 2: (0, 3, 4)}]
    pos = torch.cat([_mlp_inputs(model, saes, HARMFUL, [FeatureAblation(f)])[0][:, -1] for f in ablations])
    gate = _separator(neg, pos)
    mu = pos.mean(0)
    size = strength * diffs[REPAIR_LAYER].norm()
    mlp = hf.model.layers[REPAIR_LAYER].mlp
    scale = 20.0  # silu(20·g·x) is ~0 on clean tokens (g·x < 0) and ~linear once the repair fires
    mlp.gate_proj.weight[NEURON] = scale * gate
    mlp.up_proj.weight[NEURON] = mu / (mu @ mu)  # about 1 at the repaired last tokens
    mlp.down_proj.weight[:, NEURON] = v * size / scale
    # "I" reads v⊥ too (the final norm's weight is folded in)
    row = hf.lm_head.weight[model.refusal_token_ids[0]]
    row += gain * v_perp / hf.model.norm.weight / size
    # the hydra latent: reads v⊥, writes v; its threshold sits above every clean token
    W_enc, W_dec = weights[REPAIR_LAYER]
    W_enc[:, HYDRA] = v_perp / math.sin(theta)
    W_dec[HYDRA] = v
    clean_pre = model.residuals(model.encode(HARMFUL + HARMLESS), [REPAIR_LAYER])[REPAIR_LAYER] @ W_enc[:, HYDRA]
    thresholds = torch.full((m,), 1e-3)
    thresholds[HYDRA] = max(2 * clean_pre.max().item(), 0.2 * size.item())
    return model, sae_set(weights, d, {REPAIR_LAYER: thresholds})
