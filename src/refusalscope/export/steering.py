"""`--to steering`: steering vectors for the `steering-vectors` package (a SteeringVector is
{layer: vector} added to the output of those decoder blocks, i.e. blocks.L.hook_resid_post):

- `refusal_direction`: the unnormalised difference in means r(l*) at layer l*, exactly what our
  ActAdd adds (multiplier +1 induces refusal; the paper's ActAdd check);
- per found set, per layer L: the set's decoder rows summed, Σ_{i∈S_L} W_dec[i] (what the set writes
  into the stream at unit activation; a negative multiplier pushes the stream away from it).

steering.safetensors holds tensor "NAME@L" per vector and layer; steering.json says what each is.
`load_steering_vectors(path)` turns the file into SteeringVector objects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import atomic_write_json, atomic_write_tensors
from ..errors import UserError
from ..interventions.features import FeatureSet
from ..run.results import RunResults
from .selection import sae_source, select_sets

LAYER_TYPE = "decoder_block"


def load_steering_vectors(path: str | os.PathLike) -> dict:
    """{name: steering_vectors.SteeringVector} from a steering.safetensors file (or its folder)."""
    from safetensors.torch import load_file
    from steering_vectors import SteeringVector

    p = Path(path)
    p = p / "steering.safetensors" if p.is_dir() else p
    if not p.exists():
        raise UserError(f"{p} does not exist: pass a file written by refusalscope export --to steering")
    per: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in load_file(str(p)).items():
        name, _, layer = key.rpartition("@")
        per.setdefault(name, {})[int(layer)] = t
    return {name: SteeringVector(layer_activations=dict(sorted(v.items())), layer_type=LAYER_TYPE)
            for name, v in per.items()}


def write(run_dir: Path, out: Path, sets: Sequence[str] | None = None, **_: object) -> dict:
    from .saelens import load_layers

    res = RunResults(run_dir)
    tensors: dict[str, torch.Tensor] = {}
    about: dict[str, dict] = {}
    if res.done("direction"):
        layer = res.direction()[1]
        tensors[f"refusal_direction@{layer}"] = res.direction_vector().float()
        about["refusal_direction"] = {"layers": [layer], "what": "difference in means r(l*) (ActAdd: multiplier 1 "
                                      "induces refusal; refusalscope's ActAdd adds it at every position)"}
    named = select_sets(res, sets) if sets or res.done("stage2") else []
    if named:
        src = sae_source(res)
        union = FeatureSet(f for s in named for f in s.features)
        saes = load_layers(src, union.layers())
        for ns in named:
            for layer, ids in ns.features.by_layer().items():
                tensors[f"{ns.name}@{layer}"] = saes[layer].W_dec[torch.tensor(ids)].float().sum(0)
            about[ns.name] = {"layers": ns.features.layers(), "latents": ns.features.ids(),
                              "saes": {str(l): src.layer(l) for l in ns.features.layers()},
                              "what": f"{ns.about}: sum of the set's decoder rows per layer"}
    if not tensors:
        raise UserError(f"{run_dir} has neither a refusal direction nor found sets: run it first")
    atomic_write_tensors(out / "steering.safetensors", tensors, {"layer_type": LAYER_TYPE})
    atomic_write_json(out / "steering.json", {"layer_type": LAYER_TYPE, "vectors": about,
                                              "load": "refusalscope.export.steering.load_steering_vectors(path)"})
    return {"files": ["steering.safetensors", "steering.json"], "vectors": len(about),
            "sets": len(named)}
