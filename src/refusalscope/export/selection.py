"""What an export carries: the named latent sets `--sets` picks from a run, and each SAE layer's
identity (release + sae_id, or a local folder; Neuronpedia's model and source ids) so that a
latent id never leaves the tool without saying which SAE it indexes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..interventions.features import FeatureSet
from ..run.results import RunResults

STAGES = ("stage1", "stage2", "stage3")
NO_NEURONPEDIA = ("no public Neuronpedia pages: these SAEs ({what}) are not on Neuronpedia (saes.neuronpedia_id "
                  "is unset), so no links or list bodies are written")


@dataclass(frozen=True)
class NamedSet:
    """One exported set: `name` (e.g. "stage2/p-0003" or "core@8"), its latents, and where it came
    from in words (what a Neuronpedia list description or a bundle's README says)."""

    name: str
    features: FeatureSet
    about: str


def _stage_sets(res: RunResults, stage: str) -> dict[str, FeatureSet]:
    if not res.done(stage):
        raise UserError(f"{res.root} has no finished {stage}: run it first (refusalscope run -r {res.root}) "
                        f"or pick other --sets")
    return {"stage1": res.stage1_sets, "stage2": res.stage2_sets, "stage3": res.stage3_sets}[stage]()


ABOUT = {"stage1": "Stage 1 candidate set (top-K* latents aligned with the refusal direction per layer)",
         "stage2": "Stage 2 minimal set (latents whose ablation jailbreaks the prompt)",
         "stage3": "Stage 3 set (top-K* latents ranked by FM-embedding similarity to Stage 2 latents)"}


def select_sets(res: RunResults, picks: Sequence[str] | None) -> list[NamedSet]:
    """The sets named by `picks` (default: stage2): `stage1|stage2|stage3` (one set per prompt),
    `core@K` (the K latents most often in a Stage 2 set) or a prompt id (its Stage 2 set)."""
    out: dict[str, NamedSet] = {}
    for pick in list(picks or ["stage2"]):
        if pick in STAGES:
            for pid, fs in _stage_sets(res, pick).items():
                out[f"{pick}/{pid}"] = NamedSet(f"{pick}/{pid}", fs, f"{ABOUT[pick]} for prompt {pid}")
        elif pick.startswith("core@"):
            k = pick.removeprefix("core@")
            if not k.isdigit() or int(k) < 1:
                raise UserError(f"bad set {pick!r}: write core@K with K a whole number >= 1, e.g. core@8")
            from ..methods.eval_matrix import core_set

            sets = _stage_sets(res, "stage2")
            out[pick] = NamedSet(pick, core_set(sets, int(k)),
                                 f"the {k} latents most often in a Stage 2 set (over {len(sets)} prompts)")
        else:
            sets = _stage_sets(res, "stage2")
            if pick not in sets:
                known = ", ".join(sorted(sets)[:5]) + (", …" if len(sets) > 5 else "")
                raise UserError(f"unknown set {pick!r}: use stage1, stage2, stage3, core@K or a prompt id with a "
                                f"Stage 2 set ({known or 'none in this run'})")
            out[f"stage2/{pick}"] = NamedSet(f"stage2/{pick}", sets[pick], f"{ABOUT['stage2']} for prompt {pick}")
    return [s for s in out.values() if len(s.features)]


@dataclass(frozen=True)
class SAESource:
    """Where a run's SAEs come from, per layer: what every export writes beside a latent index."""

    kind: str  # release | local | demo
    model: str
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    neuronpedia_id: str | None = None

    def layer(self, layer: int) -> dict:
        """This layer's SAE as the tools name it: {hook_name, release + sae_id | path}."""
        out: dict = {"hook_name": f"blocks.{layer}.hook_resid_post"}
        if self.kind == "release":
            out.update(release=self.release, sae_id=str(self.sae_id).replace("{layer}", str(layer)))
        else:
            out["path"] = str(self.path).replace("{layer}", str(layer))
        return out

    def neuronpedia(self, layer: int) -> tuple[str, str] | None:
        """(modelId, source id) on Neuronpedia, e.g. ("gemma-2-2b", "12-gemmascope-res-65k"), or None."""
        if not self.neuronpedia_id:
            return None
        model, _, source = self.neuronpedia_id.replace("{layer}", str(layer)).partition("/")
        return model, source

    @property
    def description(self) -> str:
        if self.kind == "release":
            return f"SAELens release {self.release}, sae_id {self.sae_id}"
        return f"{'the demo world' if self.kind == 'demo' else 'local'} SAE folders {self.path}"


def sae_source(res: RunResults) -> SAESource:
    """The run's SAE identity, from its config.yaml."""
    cfg = res.config()
    if cfg is None:
        raise UserError(f"{res.root} has no config.yaml: export needs the run's config to name its SAEs")
    s = cfg.saes
    if s.source == "release":
        return SAESource("release", cfg.model.source, release=s.release, sae_id=s.sae_id,
                         neuronpedia_id=s.neuronpedia_id)
    if s.source == "demo":
        from ..demo.world import world_dir

        return SAESource("demo", cfg.model.source, path=str(world_dir() / "saes" / "layer_{layer}"))
    return SAESource("local", cfg.model.source, path=str(Path(s.path or "").resolve()) if s.path else None,
                     neuronpedia_id=s.neuronpedia_id)
