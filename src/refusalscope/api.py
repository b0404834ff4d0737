"""The public Python API (`import refusalscope as rs`), for notebooks and scripts.

Everything here is a thin composition of the methods the pipeline runs, so a notebook and
`refusalscope run` give the same numbers; Stages 1-3 (`api_stages`) run the pipeline's own stage
code with the CLI's config defaults. Prompts may be given as strings, (id, text) pairs or
`Prompt`s; latent sets as anything `FeatureSet` reads ("12-345", (12, 345), Feature).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
from .methods.direction import DirectionChoice, candidate_layers, mean_differences, score_candidates, select_direction
from .methods.evaluate import refusal_probs
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
