"""Planted recovery: how many of a planted world's refusal latents each stage of a run found.

A planted world (benchmarks/planted_world.py) records in world.json the latents it planted on
every layer: the ones whose ablation together moves the stream to the harmful/harmless midpoint.
A run on that world is checked against them, per stage, over the union of its per-prompt sets:
- Stage 1: the top-K* candidate sets (L_K) of the prompts Stage 1 jailbroke;
- Stage 2: the minimal sets; Stage 3: the top-K* latents of each prompt's FM ranking.
precision = |found ∩ planted| / |found|; recall = |found ∩ planted| / |planted in the layers
the stage searched| (Stage 1 and 2: Stage 1's layers; Stage 3: the FM's layers, counting Stage 2
and Stage 3 latents together, since Stage 3 ranks the latents Stage 2 did not take).

    python benchmarks/planted_recovery.py RUN_DIR WORLD_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refusalscope.interventions.features import Feature
from refusalscope.run.results import RunResults


def planted_features(world: str | Path) -> set[Feature]:
    info = json.loads((Path(world) / "world.json").read_text())
    return {Feature(int(l), int(i)) for l, ids in info["planted"].items() for i in ids}


def _score(found: set[Feature], planted: set[Feature], layers: set[int]) -> dict:
    hit = found & planted
    pool = {f for f in planted if f.layer in layers}
    return {"found": len(found), "planted_found": len(hit), "planted_in_layers": len(pool),
            "precision": round(len(hit) / len(found), 4) if found else None,
            "recall": round(len(hit & pool) / len(pool), 4) if pool else None}


def planted_recovery(run_dir: str | Path, world: str | Path) -> dict:
    """{stage1|stage2|stage3: {found, planted_found, planted_in_layers, precision, recall}} for
    the stages the run finished."""
    res, planted = RunResults(run_dir), planted_features(world)
    out: dict = {}
    if not res.done("stage1"):
        return out
    s1_layers = set(res.stage1_ranked())
    u1 = {f for s in res.stage1_sets().values() for f in s}
    out["stage1"] = _score(u1, planted, s1_layers)
    if not res.done("stage2"):
        return out
    u2 = {f for s in res.stage2_sets().values() for f in s}
    out["stage2"] = _score(u2, planted, s1_layers)
    if not res.done("stage3"):
        return out
    fm_layers = set((res.summary("stage3") or {}).get("layers", []))
    u3 = {f for s in res.stage3_sets().values() for f in s}
    out["stage3"] = _score(u3, planted, fm_layers)
    out["stage3"]["recall_with_stage2"] = _score(u2 | u3, planted, fm_layers)["recall"]
    return out


if __name__ == "__main__":
    print(json.dumps(planted_recovery(sys.argv[1], sys.argv[2]), indent=1))
