"""`--to lm-eval`: one CSV per found set for lm-evaluation-harness's `steered` model
(`lm_eval --model steered --model_args pretrained=MODEL,steer_path=SET.csv --tasks …`).

What lm-eval does with a row (lm_eval/models/hf_steered.py, 0.4.13): `loader=sae_lens` loads
`SAE.from_pretrained(sparse_model, sae_id)` (a SAELens release, or a HuggingFace repo id with the SAE
folder as sae_id), takes W_dec[feature_index] as a direction at `hookpoint` (a module of
`model.base_model`: `layers.L` is the output of decoder layer L, our blocks.L.hook_resid_post) and,
for `action=clamp`, sets the component of (h − b_dec) along that unit direction to
`steering_coefficient` (here 0) at every position. Two differences from refusalscope's ablation
follow, and each export says when they matter:
- it is a projection onto the decoder direction, not the SAE latent (the encoder is not used), so
  it removes that direction even where the latent does not fire;
- lm-eval keeps one row per hookpoint (a dict keyed by hookpoint): a layer with several latents of
  the set applies only the last one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..artifacts import atomic_write_json, atomic_write_text
from ..run.results import RunResults
from .selection import NamedSet, SAESource, sae_source, select_sets
from .tables import to_csv

COLUMNS = ("loader", "action", "sparse_model", "hookpoint", "feature_index", "steering_coefficient",
           "head_index", "sae_id", "description")


def rows(ns: NamedSet, src: SAESource) -> list[dict]:
    """The CSV rows that clamp every latent of `ns` to 0."""
    out = []
    for f in ns.features.sorted():
        sae = src.layer(f.layer)
        out.append({"loader": "sae_lens", "action": "clamp", "sparse_model": sae.get("release") or sae["path"],
                    "hookpoint": f"layers.{f.layer}", "feature_index": f.index, "steering_coefficient": 0.0,
                    "head_index": None, "sae_id": sae.get("sae_id", ""),
                    "description": f"refusalscope {ns.name} {f.id}"})
    return out


def csv_text(ns: NamedSet, src: SAESource) -> str:
    return to_csv([{c: r[c] for c in COLUMNS} for r in rows(ns, src)])


def file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", name) + ".csv"


def notes_for(named: Sequence[NamedSet], src: SAESource) -> list[str]:
    notes = []
    crowded = [ns.name for ns in named if any(len(v) > 1 for v in ns.features.by_layer().values())]
    if crowded:
        notes.append(f"{len(crowded)} set(s) have several latents on one layer (e.g. {crowded[0]}): lm-eval's steered "
                     "model keeps one row per hookpoint, so it applies only the last of them")
    if src.kind != "release":
        notes.append(f"the SAEs are {src.description}: lm-eval loads SAEs with SAE.from_pretrained only, so put each "
                     "layer's SAELens folder in a HuggingFace repo and write its id as sparse_model, the folder as "
                     "sae_id")
    return notes


def write(run_dir: Path, out: Path, sets: Sequence[str] | None = None, **_: object) -> dict:
    res = RunResults(run_dir)
    named = select_sets(res, sets)
    src = sae_source(res)
    files = []
    for ns in named:
        atomic_write_text(out / file_name(ns.name), csv_text(ns, src))
        files.append(file_name(ns.name))
    atomic_write_json(out / "sets.json", {file_name(ns.name): {"set": ns.name, "about": ns.about,
                                                                "latents": ns.features.ids()} for ns in named})
    notes = notes_for(named, src)
    return {"files": [*files, "sets.json"], "sets": len(named), "notes": notes}
