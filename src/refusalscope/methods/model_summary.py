"""Facts about the model and its SAEs that the report states (width, L0, layers), measured on
the run's own corpus so they hold for whatever SAEs a run loaded, not only the demo's."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..io.model import ChatModel
from ..io.sae_lazy import LazySAESet
from ..io.saes import sae_width
from .activity import sinks


def model_summary(model: ChatModel, saes, texts: Sequence[str], batch_size: int = 16,
                  max_length: int | None = 128, sink_ratio: float | None = 4.0) -> dict:
    """Model size and, per SAE layer, width, architecture, hook, mean L0 (active latents per
    token, sink positions such as BOS left out as SAE papers do) and the share of latents that
    never fire on `texts`."""
    hf = model.hf
    saes_out: list[dict] = []
    out: dict = {"model": {"name": model.name, "architecture": type(hf).__name__, "n_layers": model.n_layers,
                     "d_model": model.d_model, "vocab": len(model.tokenizer),
                     "parameters": sum(p.numel() for p in hf.parameters()), "dtype": str(model.dtype).split(".")[-1]},
           "n_texts": len(texts), "saes": saes_out}
    layers = list(saes.layers)
    # a lazy set keeps the layers its caller holds; the others are dropped after each use, so the
    # summary of every layer never holds more than one extra layer (26 x 65k SAEs: 15.7 GB in fp32)
    lazy = isinstance(saes, LazySAESet)
    held = set(saes.loaded) if lazy else set(layers)
    meta: dict[int, dict] = {}

    def use(l: int):
        fd = saes[l]
        meta.setdefault(l, {"d_sae": fd.d_sae, "architecture": fd.architecture, "hook": fd.hook_name, "k": fd.k})
        return fd

    def done_with(l: int) -> None:
        if lazy and l not in held:
            saes.release(keep=[x for x in saes.loaded if x != l])

    l0 = {l: [0.0, 0] for l in layers}
    fired = {l: torch.zeros(sae_width(saes, l), dtype=torch.bool) for l in layers}
    if texts:
        batch = model.encode_texts(list(texts), add_special_tokens=False, max_length=max_length)
        for start in range(0, len(batch), batch_size):
            sub = batch.rows(start, min(start + batch_size, len(batch)))
            res = model.residuals(sub, layers, host=False)
            for l in layers:  # reduced where the SAE is: [b, T, d_sae] never crosses to the host
                fd = use(l)
                valid = sub.attention_mask.bool().to(fd.device)
                h = res.pop(l).to(fd.device)
                keep = valid & ~sinks(h, valid, sink_ratio)
                on = (fd.encode(h) > 0) & keep.unsqueeze(-1)
                l0[l][0] += float(on.sum())
                l0[l][1] += int(keep.sum())
                fired[l] |= on.any(dim=(0, 1)).cpu()
                del on, fd
                done_with(l)
    for l in layers:
        if l not in meta:
            use(l)
            done_with(l)
        saes_out.append({"layer": l, **meta[l], "l0": round(l0[l][0] / l0[l][1], 2) if l0[l][1] else None,
                         "dead_share": round(1 - float(fired[l].float().mean()), 4) if texts else None})
    return out
