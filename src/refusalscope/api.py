"""The public Python API (`import refusalscope as rs`), for notebooks and scripts.

Everything here is a thin composition of the methods the pipeline runs, so a notebook and
`refusalscope run` give the same numbers. Prompts may be given as strings, (id, text) pairs or
`Prompt`s; latent sets as anything `FeatureSet` reads ("12-345", (12, 345), Feature).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .interventions.features import Feature, FeatureSet
from .interventions.spec import DirectionAblation, FeatureClamp, Intervention, Positions
from .io.model import ChatModel, load_chat_model
from .io.prompts import Prompt
from .io.saes import SAESet
from .measures.judges import Judge, make_judge
from .methods.activity import activity
from .methods.direction import DirectionChoice, candidate_layers, mean_differences, score_candidates, select_direction
from .methods.evaluate import refusal_probs
from .methods.fm import FMResult, rank_by_embedding_similarity, train_fm
from .methods.fm_data import collect_sae_activations, fm_dataset
from .methods.ladder import ladder
from .methods.records import LadderRecord, Stage2Record, Stage3Record
from .methods.stage1 import aligned_latents, search_k, top_k_set
from .methods.stage2 import PAPER_TAUS, minimal_set
from .methods.stage3 import PAPER_KS, stage3_search
from .run.results import RunResults

PromptsLike = Iterable[str | tuple[str, str] | Prompt]


# ----------------------------------------------------------------- loading
def load_model(source: str | os.PathLike = "demo", **kwargs: Any) -> ChatModel:
    """A chat model from "demo" (the embedded demo world; built on first use), a hub id, a local
    folder or a .gguf file. Keywords: dtype, device, system_prompt, refusal_tokens, gguf_file."""
    if str(source) == "demo":
        from .demo.world import build_world, is_built, load_demo_model

        if not is_built():
            build_world(quiet=kwargs.pop("quiet", False))
        return load_demo_model(**{k: v for k, v in kwargs.items() if k != "quiet"})
    return load_chat_model(source, **kwargs)


def load_saes(source: Any = "demo", layers: Iterable[int] | str = "all", model: ChatModel | None = None,
              device: str | None = None, dtype: Any = None) -> SAESet:
    """SAEs for `layers`: "demo", a folder template with {layer} (SAELens, Gemma Scope or Llama
    Scope layout), {"release": ..., "sae_id": "...{layer}..."} (SAELens registry), or a mapping
    layer -> spec. With `model`, they are put on its device/dtype and checked against its width."""
    from .io.sae_loading import load_sae_set

    if str(source) == "demo":
        from .demo.world import demo_layers, sae_dir

        wanted: list[Any] = demo_layers() if layers == "all" else list(layers)
        source, layers = {l: str(sae_dir(l)) for l in wanted}, wanted
    elif layers == "all":
        if model is None:
            raise UserError("layers='all' needs the model (to know its layer count): pass model= or a layer list")
        layers = list(range(model.n_layers))
    dev = device or (str(model.device) if model is not None else "cpu")
    dt = dtype or (model.dtype if model is not None else torch.float32)
    saes = load_sae_set(source, list(layers), device=dev, dtype=dt, quiet=True)
    if model is not None:
        saes.check_against(model.d_model, model.n_layers)
    return saes


def load_prompts(spec: str | os.PathLike, text_field: str | None = None) -> list[Prompt]:
    """A prompt set: "bundled:NAME[:SPLIT]" or a file/folder in any format the loaders read."""
    from .run.resolve import load_prompt_set

    return load_prompt_set(str(spec), text_field)


def open_run(run_dir: str | os.PathLike) -> RunResults:
    """Typed results of a run directory (stage summaries, Stage 1/2/3 records, sets, direction)."""
    return RunResults(run_dir)


def run(config: Any = "demo", run_dir: str | os.PathLike | None = None, upto: str = "analyses",
        quiet: bool = False, accept_version: bool = False) -> RunResults:
    """Run (or resume) the pipeline on a config (preset name, YAML file or Config) into run_dir.
    `accept_version` continues a run directory written by another refusalscope release."""
    from .run.runner import open_context, run_pipeline

    out = run_pipeline(open_context(config, run_dir, quiet=quiet, accept_version=accept_version), upto)
    return RunResults(out["run"])


# ----------------------------------------------------------------- interventions
def plan(ablate: Any = None, clamp: Mapping[Any, float] | None = None, direction: torch.Tensor | None = None,
         positions: Positions = "all", clamp_positions: Positions = (0,)) -> list[Intervention]:
    """Interventions for one row: zero-ablate the latents `ablate`, set `clamp` {latent: value}
    at `clamp_positions` (default BOS), and/or project out `direction` at every layer."""
    out: list[Intervention] = list(FeatureSet(ablate or ()).plan(positions))
    if clamp:
        table: dict[int, dict[int, float]] = {}
        for f, v in clamp.items():
            feat = Feature.of(f)
            table.setdefault(feat.layer, {})[feat.index] = float(v)
        out.append(FeatureClamp(table, clamp_positions))
    if direction is not None:
        out.append(DirectionAblation(direction))
    return out


def generate(model: ChatModel, prompts: PromptsLike, saes: SAESet | None = None, *, max_new_tokens: int = 48,
             batch_size: int = 16, **intervention: Any) -> list[str]:
    """Greedy replies with the same interventions on every prompt (see `plan` for the keywords:
    ablate, clamp, direction, positions, clamp_positions)."""
    from .interventions.engine import intervene

    texts = [t for _, t in _pairs(prompts)]
    with intervene(model, saes, shared=plan(**intervention)):
        return model.generate(model.encode(texts), max_new_tokens=max_new_tokens, batch_size=batch_size)


def refusal_probability(model: ChatModel, prompts: PromptsLike, saes: SAESet | None = None, *,
                        batch_size: int = 16, **intervention: Any) -> torch.Tensor:
    """P(refusal token, "I" by default) at the last prompt position, per prompt, under `plan`'s
    interventions: the quantity Algorithm 1 measures."""
    return refusal_probs(model, saes, [t for _, t in _pairs(prompts)], shared=plan(**intervention),
                         batch_size=batch_size)


@contextmanager
def apply(model: Any, intervention: Any, saes: Any = None, *, name: str | None = None,
          mode: str = "sparse") -> Iterator[Any]:
    """Run a plain transformers model (or a ChatModel) with an intervention inside the block, so
    that its own `model(...)` / `model.generate(...)` give the engine's numbers: a FeatureSet or
    latent ids (zero-ablated everywhere, needs `saes`), a direction tensor (projected out of every
    layer), `Intervention`s, or a SAELens bundle (`refusalscope export --to saelens`: its folder,
    or `load_bundle`'s result; `name` picks a set, and its own SAE slices serve unless `saes` is
    given). `saes`: an SAESet or SAELens SAEs (a list, or {layer: SAE})."""
    from .interventions.apply import apply as apply_plan

    if isinstance(intervention, (str, os.PathLike)) and Path(intervention).exists():
        from .export.bundle import load_bundle

        intervention = load_bundle(intervention)
    if _is_bundle(intervention):
        intervention, saes = _bundle_plan(intervention, name, saes)
    with apply_plan(model, intervention, saes, mode=mode) as out:
        yield out


def _is_bundle(obj: Any) -> bool:
    from .export.bundle import Bundle

    return isinstance(obj, Bundle)


def _bundle_plan(bundle: Any, name: str | None, saes: Any) -> tuple[list[Intervention], Any]:
    """The bundle's set as interventions, on the full SAEs when given, else on the bundle's own
    slices (its latents renumbered to their columns there; TopK layers need the full SAE)."""
    if saes is not None:
        return bundle.interventions(name), saes
    fs = bundle.set(name)
    topk = [l for l in fs.layers() if bundle.saes[l]["architecture"] == "topk"]
    if topk:
        raise UserError(f"layer {topk[0]}'s SAE is TopK, which needs every latent: pass saes= (load it as "
                        f"{bundle.sae_specs()[topk[0]]})")
    local = FeatureSet((f.layer, bundle.indices[f.layer].index(f.index)) for f in fs)
    slices = SAESet({l: bundle.slices[l] for l in fs.layers()})
    act = bundle.action
    if act.kind == "ablate":
        return [local.ablation(act.positions)], slices
    if act.kind == "clamp":
        return [local.clamp(float(act.value or 0.0), act.positions)], slices
    raise UserError("a scale bundle has no refusalscope engine form: apply it with Bundle.tl_hooks()")


# ----------------------------------------------------------------- the method
def find_direction(model: ChatModel, harmful: PromptsLike, harmless: PromptsLike, *, val_harmful: PromptsLike,
                   val_harmless: PromptsLike, judge: Judge | str = "substring", positions: Sequence[int] = (-1,),
                   layers: Sequence[int] | str = "auto", max_kl: float = 0.1, n_generate: int = 4,
                   max_new_tokens: int = 48, batch_size: int = 16) -> DirectionChoice:
    """The refusal direction: difference in means per layer on the train prompts, l* chosen on
    the validation prompts by attack success rate (paper appendix). `.direction` is r̂(l*)."""
    j = make_judge(judge) if isinstance(judge, str) else judge
    texts = lambda ps: [t for _, t in _pairs(ps)]  # noqa: E731
    diffs = mean_differences(model, texts(harmful), texts(harmless), list(positions), batch_size)
    vh, vs = texts(val_harmful), texts(val_harmless)
    table = score_candidates(model, diffs, list(positions), candidate_layers(model.n_layers, layers), vh, vs,
                             batch_size)
    return select_direction(model, diffs, list(positions), table, vh, vs, j, max_kl, n_generate, max_new_tokens,
                            batch_size)


def stage1(model: ChatModel, saes: SAESet, prompts: PromptsLike, direction: torch.Tensor, judge: Judge, *,
           layers: Sequence[int] | None = None, ks: Sequence[int] = ladder(10, 10, 200), max_new_tokens: int = 48,
           batch_size: int = 16) -> tuple[list[LadderRecord], dict[str, FeatureSet]]:
    """Stage 1: per prompt the smallest K whose top-K-per-layer aligned latents jailbreak it.
    Returns the records and, per record with a K, its candidate set L_K (Stage 2's input)."""
    layers = list(layers) if layers is not None else [l for l in saes.layers if l >= 2]
    ranked, _ = aligned_latents(saes, direction, layers, max(ks))
    recs = search_k(model, saes, _pairs(prompts), ranked, ks, judge, max_new_tokens, batch_size, quiet=True)
    return recs, {r.id: top_k_set(ranked, r.k) for r in recs if r.k is not None}


def stage2(model: ChatModel, saes: SAESet, prompts: PromptsLike, candidates: Mapping[str, Any], judge: Judge, *,
           block_size: int = 5, taus: Sequence[float] = PAPER_TAUS, seeds: Sequence[int] = (0, 1, 2),
           max_new_tokens: int = 48, batch_size: int = 16, forward_batch_size: int = 32) -> list[Stage2Record]:
    """Stage 2 (Algorithm 1 over τ × seeds) for each prompt with a candidate set, plus which of
    the chosen set's latents fire on the plain prompt."""
    pairs = [(pid, t) for pid, t in _pairs(prompts) if pid in candidates]
    out = [minimal_set(model, saes, pid, t, candidates[pid], judge, block_size=block_size, taus=taus, seeds=seeds,
                       batch_size=forward_batch_size, max_new_tokens=max_new_tokens, generation_batch_size=batch_size)
           for pid, t in pairs]
    sets = {r.id: r.set for r in out if r.set is not None}
    act = activity(model, saes, [(p, t) for p, t in pairs if p in sets], sets, batch_size)
    for r in out:
        if r.id in act:
            r.active, r.inactive = act[r.id].active, act[r.id].inactive
    return out


@dataclass
class Interactions:
    """Stage 3's factorization machine, its columns, the ranking of new latents by embedding
    similarity to the Stage 2 latents, and the K ladder per prompt (Table 2)."""

    fm: FMResult
    columns: list[Feature]
    ranking: list[tuple[Feature, float]]
    records: list[Stage3Record]


def stage3(model: ChatModel, saes: SAESet, prompts: PromptsLike, stage2: Sequence[Stage2Record], judge: Judge, *,
           harmful: PromptsLike, harmless: PromptsLike, layers: Sequence[int], ks: Sequence[int] = PAPER_KS,
           n_tokens: int = 4, embedding_size: int = 20, epochs: int = 20, lr: float = 1e-3, seed: int = 0,
           max_new_tokens: int = 48, batch_size: int = 16) -> Interactions:
    """Stage 3: an FM on SAE activations (harmful = 1, harmless = 0) at `layers`, latents ranked
    by similarity to the Stage 2 latents, and per prompt the smallest K whose top-K ablation
    (with the prompt's active Stage 2 latents) jailbreaks it."""
    texts = lambda ps: [t for _, t in _pairs(ps)]  # noqa: E731
    acts = [collect_sae_activations(model, saes, texts(ps), layers, n_tokens, batch_size) for ps in (harmful, harmless)]
    data = fm_dataset(acts[0], acts[1], seed)
    fm = train_fm(data.train, data.val, data.test, k=embedding_size, lr=lr, epochs=epochs, seed=seed)
    union = {f for r in stage2 if r.set is not None for f in r.set}
    ranking = rank_by_embedding_similarity(fm.model, data.columns, union)
    active = {r.id: r.active or FeatureSet() for r in stage2 if r.set is not None}
    recs = stage3_search(model, saes, _pairs(prompts), active, ranking, ks, judge=judge,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    return Interactions(fm, data.columns, ranking, [
        Stage3Record(r.id, r.k, r.tried, r.completions, r.verdicts, active.get(r.id, FeatureSet())) for r in recs])


def _pairs(prompts: PromptsLike) -> list[tuple[str, str]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            out.append((p.id or f"p{i}", p.text))
        elif isinstance(p, str):
            out.append((f"p{i}", p))
        else:
            pid, text = p
            out.append((str(pid), str(text)))
    if not out:
        raise UserError("no prompts given: pass at least one prompt")
    return out
