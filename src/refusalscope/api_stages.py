"""Stages 1-3 of the Python API (`rs.stage1`, `rs.stage2`, `rs.stage3`): the pipeline's own code.

Each call runs what `refusalscope run` runs, with defaults from the same Config the CLI reads
(`config`: a Config, preset name or YAML file; None: the demo preset, the CLI's default), so a
notebook and a run give the same sets and tables: Stage 1 and Stage 3 run the pipeline's stage
functions on a scratch run store fed with the caller's objects (`run.session`), Stage 2 the
pipeline's per-shard task. Keywords given explicitly override the config's fields.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .api import PromptsLike, _pairs
from .errors import UserError
from .interventions.features import Feature, FeatureSet
from .io.model import ChatModel
from .io.saes import SAESet
from .measures.judges import Judge
from .methods.direction import DirectionChoice
from .methods.ladder import ladder
from .methods.records import LadderRecord, Stage2Record, Stage3Record
from .run.session import Session, api_config

RunDir = str | os.PathLike | None


def _ladder(ks: Sequence[int]) -> dict:
    """Stage 1's k_start / k_step / k_max for an explicit K list (it must be such a ladder)."""
    ks = sorted(int(k) for k in ks)
    if not ks:
        raise UserError("no K values given: pass a ladder such as [10, 20, 30]")
    step = ks[1] - ks[0] if len(ks) > 1 else 1
    if step < 1 or ladder(ks[0], step, ks[-1]) != ks:
        raise UserError(f"Stage 1 K values {ks} are not a ladder start, start + step, …: pass evenly spaced K")
    return {"k_start": ks[0], "k_step": step, "k_max": ks[-1]}


def _gen(max_new_tokens: int | None, batch_size: int | None) -> dict:
    return {k: v for k, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)) if v is not None}


def stage1(model: ChatModel, saes: SAESet, prompts: PromptsLike, direction: DirectionChoice | torch.Tensor,
           judge: Judge | None = None, *, lstar: int | None = None, layers: Sequence[int] | None = None,
           ks: Sequence[int] | None = None, config: Any = None, max_new_tokens: int | None = None,
           batch_size: int | None = None, run_dir: RunDir = None,
           quiet: bool = True) -> tuple[list[LadderRecord], dict[str, FeatureSet]]:
    """Stage 1: per prompt the smallest K whose top-K-per-layer aligned latents jailbreak it, on
    the pipeline's layers (SAE layers up to l* less `stage1.exclude_layers`; `layers` replaces
    both). `direction`: find_direction's result, or r̂ with `lstar`. `judge` None: the config's.
    Returns the records and, per record with a K, its candidate set L_K (Stage 2's input)."""
    vector = None
    if isinstance(direction, DirectionChoice):
        lstar = direction.layer if lstar is None else lstar
        vector = direction.vector
        direction = direction.direction
    s1: dict = {"layers": sorted(set(layers)), "exclude_layers": []} if layers is not None else {}
    cfg = api_config(config, stage1={**s1, **(_ladder(ks) if ks is not None else {})},
                     generation=_gen(max_new_tokens, batch_size))
    if lstar is None:
        if cfg.stage1.layers == "to_lstar":
            raise UserError("Stage 1 searches SAE layers up to l*: pass lstar=, find_direction's result as "
                            "the direction, or layers=")
        lstar = max(saes.keys())
    with Session(model, saes, judge, cfg, run_dir, quiet) as s:
        s.put_prompts(_pairs(prompts))
        s.put_direction(direction, lstar, vector)
        s.run("stage1")
        return list(s.results.stage1().values()), s.results.stage1_sets()


def stage2(model: ChatModel, saes: SAESet, prompts: PromptsLike, candidates: Mapping[str, Any],
           judge: Judge | None = None, *, block_size: int | None = None, taus: Sequence[float] | None = None,
           seeds: Sequence[int] | None = None, config: Any = None, max_new_tokens: int | None = None,
           batch_size: int | None = None, forward_batch_size: int | None = None,
           quiet: bool = True) -> list[Stage2Record]:
    """Stage 2 (Algorithm 1 over τ × seeds, `stage2` of the config) for each prompt with a
    candidate set, plus which of the chosen set's latents fire on the plain prompt: the
    pipeline's own Stage 2 task, per prompt. Candidates keep their order (Stage 1's: per layer,
    by alignment), which Algorithm 1's seeded blocks depend on."""
    from .run.stage_search import stage2_task

    s2 = {k: v for k, v in (("block_size", block_size), ("taus", list(taus) if taus is not None else None),
                            ("seeds", list(seeds) if seeds is not None else None),
                            ("batch_size", forward_batch_size)) if v is not None}
    cfg = api_config(config, stage2=s2, generation=_gen(max_new_tokens, batch_size))
    out = []
    with Session(model, saes, judge, cfg, None, quiet) as s:
        for pid, text in _pairs(prompts):
            if pid not in candidates:
                continue
            table: dict[int, list[int]] = {}
            for f in FeatureSet(candidates[pid]):  # Stage 1's order: layer by layer, best aligned first
                table.setdefault(f.layer, []).append(f.index)
            ranked = {l: torch.tensor(v, dtype=torch.long) for l, v in table.items()}
            k = max((len(v) for v in table.values()), default=0)
            out += [Stage2Record.from_json(r) for r in stage2_task(s.ctx, [(pid, text, k)], {"ranked": ranked})]
    return out


@dataclass
class Interactions:
    """Stage 3 as the pipeline writes it: per prompt its K ladder record (Table 2) and the ranking
    it took latents from (FM-embedding similarity to its Stage 2 set), and the stage's summary
    (FM and probe accuracies, Table 2 counts, FM vs probe)."""

    records: list[Stage3Record]
    rankings: dict[str, list[tuple[Feature, float]]]
    summary: dict


def _texts_or_spec(s: Session, name: str, value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [s.prompt_file(name, [t for _, t in _pairs(value)])]


def stage3(model: ChatModel, saes: SAESet, prompts: PromptsLike, stage2: Sequence[Stage2Record],
           judge: Judge | None = None, *, harmful: Any, harmless: Any, layers: Sequence[int] | None = None,
           direction: DirectionChoice | torch.Tensor | None = None, lstar: int | None = None,
           ks: Sequence[int] | None = None, config: Any = None, max_new_tokens: int | None = None,
           batch_size: int | None = None, run_dir: RunDir = None, quiet: bool = True) -> Interactions:
    """Stage 3 as `refusalscope run` runs it (`stage3` of the config: per-token rows, per-prompt
    ranking): an FM on SAE activations of `harmful` (1) and `harmless` (0) prompts (texts, or prompt
    set specs), latents ranked by similarity to each prompt's Stage 2 set, and per prompt the
    smallest K whose top-K ablation (with its active Stage 2 latents) jailbreaks it. FM layers:
    `layers`, else SAE layers 2..l* (pass `direction` / `lstar`)."""
    vector = None
    if isinstance(direction, DirectionChoice):
        lstar = direction.layer if lstar is None else lstar
        vector = direction.vector
        direction = direction.direction
    s3: dict = {k: v for k, v in (("layers", list(layers) if layers is not None else None),
                                  ("ks", list(ks) if ks is not None else None)) if v is not None}
    cfg = api_config(config, stage3=s3, generation=_gen(max_new_tokens, batch_size))
    if cfg.stage3.layers == "auto" and lstar is None:
        raise UserError("Stage 3's FM reads SAE layers 2..l*: pass layers=, lstar= or find_direction's result "
                        "as direction=")
    with Session(model, saes, judge, cfg, run_dir, quiet) as s:
        files = {"harmful": _texts_or_spec(s, "harmful", harmful), "harmless": _texts_or_spec(s, "harmless", harmless)}
        s.ctx.cfg, s.ctx.hashes = api_config(cfg, stage3=files), {}
        s.put_prompts(_pairs(prompts))
        if lstar is not None:
            d = direction if direction is not None else torch.ones(model.d_model)
            s.put_direction(d, lstar, vector)
        s.put_stage2(stage2)
        summary = s.run("stage3")
        return Interactions(list(s.results.stage3().values()), s.results.stage3_rankings(), summary)
