"""Random SAEs (real SAELens objects) sized for the tiny test models."""

import numpy as np
import torch

from refusalscope.io.sae_loading import load_sae
from refusalscope.io.saes import FeatureDictionary, SAESet, make_jumprelu_sae, make_relu_sae, make_topk_sae


def _weights(d, m, seed):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, m, generator=g) / d ** 0.5
    W_dec = torch.randn(m, d, generator=g) / d ** 0.5
    b_enc = torch.randn(m, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    return W_enc, W_dec, b_enc, b_dec


def sae_set(kind: str, layers, d: int = 64, m: int = 128, seed: int = 0, tmp_path=None) -> SAESet:
    """kind: jumprelu | topk | relu | gemmascope | llamascope (the last two through real folders)."""
    loaded = {}
    for layer in layers:
        W_enc, W_dec, b_enc, b_dec = _weights(d, m, seed + layer)
        hook = f"blocks.{layer}.hook_resid_post"
        if kind == "jumprelu":
            thr = torch.rand(m, generator=torch.Generator().manual_seed(layer)) * 0.2
            sae = make_jumprelu_sae(W_enc, W_dec, b_enc, b_dec, thr, hook_name=hook)
        elif kind == "topk":
            sae = make_topk_sae(W_enc, W_dec, b_enc, b_dec, 8, hook_name=hook)
        elif kind == "relu":
            sae = make_relu_sae(W_enc, W_dec, b_enc, b_dec, hook_name=hook)
        elif kind == "gemmascope":
            folder = tmp_path / f"gemma-scope-2b-pt-res/layer_{layer}/width_16k/average_l0_50"
            folder.mkdir(parents=True)
            np.savez(folder / "params.npz", W_enc=W_enc.numpy(), W_dec=W_dec.numpy(), b_enc=b_enc.numpy(),
                     b_dec=b_dec.numpy(), threshold=(torch.rand(m) * 0.2).numpy())
            sae = load_sae(str(folder), layer=layer).sae
        elif kind == "llamascope":
            sae = _llamascope(tmp_path / f"l{layer}r_8x", layer, W_enc, W_dec, b_enc, b_dec)
        else:
            raise ValueError(kind)
        loaded[layer] = sae
    return SAESet({l: FeatureDictionary.from_sae(s, l) for l, s in loaded.items()}, saes=loaded)


def _llamascope(folder, layer, W_enc, W_dec, b_enc, b_dec):
    import json

    from safetensors.torch import save_file

    (folder / "checkpoints").mkdir(parents=True)
    d, m = W_enc.shape
    save_file({"encoder.weight": W_enc.t().contiguous(), "decoder.weight": W_dec.t().contiguous(),
               "encoder.bias": b_enc, "decoder.bias": b_dec}, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": d, "d_sae": m, "hook_point_in": f"blocks.{layer}.hook_resid_post",
        "hook_point_out": f"blocks.{layer}.hook_resid_post", "jump_relu_threshold": 0.05,
        "dataset_average_activation_norm": {"in": 6.0, "out": 6.0}, "top_k": 8}))
    return load_sae(str(folder), layer=layer).sae
