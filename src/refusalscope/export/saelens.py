"""`--to saelens`: the found sets as a small bundle a SAELens / TransformerLens user applies in a few
lines: bundle.json (sets, per-layer SAE release + sae_id or folder, the intervention and what it
means) + bundle.safetensors (the SAE rows of the bundle's latents) + README.md. Read it back with
`refusalscope.export.bundle.load_bundle`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import atomic_write_json, atomic_write_tensors, atomic_write_text
from ..interventions.features import FeatureSet
from ..run.results import RunResults
from .bundle import FORMAT, VERSION, Action
from .selection import NamedSet, SAESource, sae_source, select_sets

SEMANTICS = ("At every listed layer L the hook edits blocks.L.hook_resid_post (the output of decoder layer L, "
             "hidden_states[L+1] in transformers) at the token positions given (\"all\": every prompt and "
             "generated token): h' = h - sum over the set's latents i of (f_i(h) - t_i) * W_dec[i], where f_i "
             "is the SAE's activation and t_i the new value (ablate: 0, clamp: value, scale: value * f_i). "
             "The SAE error term (h - SAE(h)) is kept, so latents outside the set and everything the SAE fails "
             "to reconstruct pass through unchanged: this is not SAELens's default splice "
             "(use_error_term=False), which would replace h by the reconstruction.")


def load_layers(src: SAESource, layers: Sequence[int]):
    """The run's SAEs of `layers` (what the run itself loaded; release SAEs come from the hub cache)."""
    from ..io.sae_loading import load_sae_set

    specs = {l: {k: v for k, v in src.layer(l).items() if k != "hook_name"} for l in layers}
    return load_sae_set({l: s.get("path") or s for l, s in specs.items()}, list(layers), quiet=True)


def bundle_files(sets: Sequence[NamedSet], src: SAESource, action: Action, out: Path, saes=None,
                 model: str | None = None) -> list[str]:
    """Write bundle.json, bundle.safetensors and README.md for `sets` into `out`; returns the names."""
    union = FeatureSet(f for s in sets for f in s.features).sorted()
    saes = saes if saes is not None else load_layers(src, union.layers())
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for layer, ids in union.by_layer().items():
        fd = saes[layer]
        idx = torch.tensor(ids, dtype=torch.long)
        tensors.update({f"indices.{layer}": idx, f"W_enc.{layer}": fd.W_enc[:, idx].float().contiguous(),
                        f"b_enc.{layer}": fd.b_enc[idx].float().contiguous(),
                        f"threshold.{layer}": fd.threshold[idx].float().contiguous(),
                        f"W_dec.{layer}": fd.W_dec[idx].float().contiguous(), f"b_dec.{layer}": fd.b_dec.float()})
        layers[str(layer)] = {**src.layer(layer), "architecture": fd.architecture, "d_in": fd.d_in,
                              "d_sae": fd.d_sae, "k": fd.k, "apply_b_dec_to_input": fd.apply_b_dec_to_input}
    meta = {"format": FORMAT, "version": VERSION, "model": model or src.model, "tensors": "bundle.safetensors",
            "intervention": {**action.to_json(), "keep_error_term": True}, "semantics": SEMANTICS,
            "saes": layers,
            "sets": [{"name": s.name, "about": s.about,
                      "features": [{"layer": f.layer, "index": f.index, "id": f.id, "sae": src.layer(f.layer)}
                                   for f in s.features]} for s in sets]}
    atomic_write_tensors(out / "bundle.safetensors", tensors, {"format": FORMAT})
    atomic_write_json(out / "bundle.json", meta)
    atomic_write_text(out / "README.md", readme(sets, src, action))
    return ["bundle.json", "bundle.safetensors", "README.md"]


def readme(sets: Sequence[NamedSet], src: SAESource, action: Action) -> str:
    name = sets[0].name if len(sets) == 1 else None
    arg = f'"{name}"' if name else '"<set name>"'
    what = {"ablate": "zero-ablates", "clamp": f"clamps to {action.value}", "scale": f"scales by {action.value}"}
    return f"""# refusalscope SAELens bundle

{len(sets)} latent set(s) of {src.model} ({src.description}); the intervention {what[action.kind]} each latent
of a set at positions {action.positions}.

{SEMANTICS}

Files: `bundle.json` (sets, each latent with its SAE; per layer the SAE's release + sae_id or folder,
architecture and hook) and `bundle.safetensors` (per layer L: `indices.L`, `W_enc.L` [d_in, n],
`b_enc.L`, `threshold.L`, `W_dec.L` [n, d_in], `b_dec.L` for the bundle's n latents of layer L).

```python
from refusalscope.export.bundle import load_bundle
b = load_bundle("{'<this folder>'}")
# TransformerLens / SAELens HookedSAETransformer (JumpReLU and ReLU SAEs need nothing else):
logits = model.run_with_hooks(tokens, fwd_hooks=b.tl_hooks({arg}))
# a plain transformers model:
import refusalscope as rs
with rs.apply(hf_model, b):
    hf_model.generate(...)
```
"""


def write(run_dir: Path, out: Path, sets: Sequence[str] | None = None, intervention: str = "ablate",
          **_: object) -> dict:
    """One bundle holding every picked set (load_bundle(out).set(name) picks one)."""
    res = RunResults(run_dir)
    named = select_sets(res, sets)
    action = Action.parse(intervention)
    files = bundle_files(named, sae_source(res), action, out) if named else []
    return {"sets": len(named), "files": files, "intervention": action.to_json()}
