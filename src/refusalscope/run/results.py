"""The one reader of a run directory: typed results of every stage, for the pipeline's later
stages, the report, the web app and the Python API alike (no one reaches into JSON by hand).

Reads are lazy and uncached, so a reader over a run that is still going sees what is there now.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from ..io.prompts import Prompt
from ..methods.records import LadderRecord, Stage2Record, Stage3Record
from .store import RunStore, read_json, read_jsonl, read_tensors


class RunResults:
    """Typed, read-only access to a run directory written by `refusalscope run`."""

    def __init__(self, root: str | os.PathLike | RunStore):
        self.store = root if isinstance(root, RunStore) else RunStore(root, create=False)
        self.root = self.store.root

    # ----------------------------------------------------------------- generic
    def done(self, stage: str) -> bool:
        """Whether `stage` finished (a later config change may still make it stale)."""
        return (self.store.status(stage) or {}).get("status") == "done"

    def summary(self, stage: str) -> dict | None:
        """The stage's summary from the manifest (None when it has not finished)."""
        return (self.store.status(stage) or {}).get("summary") if self.done(stage) else None

    def path(self, stage: str, name: str) -> Path:
        """An artifact's path; a one-line error when the stage has not written it."""
        p = self.store.path(stage, name)
        if not p.exists():
            raise UserError(f"{p} is missing: run the `{stage}` stage first (refusalscope run -r {self.root})")
        return self.store.verify(stage, name)

    def has(self, stage: str, name: str) -> bool:
        return self.store.path(stage, name).exists()

    def stages(self) -> dict[str, dict]:
        """Every stage the manifest knows, with status, seconds and summary."""
        return dict(self.store.manifest["stages"])

    def json(self, stage: str, name: str) -> Any:
        return read_json(self.path(stage, name))

    def jsonl(self, stage: str, name: str) -> list[dict]:
        return read_jsonl(self.path(stage, name))

    def table(self, stage: str, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(stage, name))

    def config_text(self) -> str | None:
        p = self.root / "config.yaml"
        return p.read_text(encoding="utf-8") if p.exists() else None

    def config(self):
        """The run's Config (from config.yaml), or None for a run written without one."""
        from .config import load_config

        p = self.root / "config.yaml"
        return load_config(p) if p.exists() else None

    # ----------------------------------------------------------------- filter + direction
    def kept_prompts(self) -> list[Prompt]:
        """The refused harmful test prompts Stages 1-3 dissect (the search split)."""
        return [Prompt(text=r["text"], id=r["id"], category=r["category"], label="harmful", split="search")
                for r in self.json("filter", "kept.json")]

    def baseline_replies(self) -> dict[str, dict]:
        """Per harmful test prompt, the unablated reply and the judge's call: {reply, refused}."""
        return {r["id"]: {"reply": r.get("completion"), "refused": bool(r["refused"])}
                for r in self.jsonl("filter", "completions.jsonl")}

    def direction_candidates(self) -> pd.DataFrame:
        """Per candidate (position, layer): P(refusal) ablated, KL on harmless, ASR where judged."""
        return self.table("direction", "candidates.parquet")

    def search_prompts(self) -> list[Prompt]:
        """Same as `kept_prompts`: the refused prompts the sets were found on."""
        return self.kept_prompts()

    def heldout_prompts(self) -> list[Prompt]:
        """Refused harmful test prompts held out of Stages 1-3 (`data.heldout_fraction`), only
        evaluated; empty when the run holds none out."""
        if not self.has("filter", "heldout.json"):
            self.path("filter", "kept.json")  # a one-line error when the filter has not run
            return []
        return [Prompt(text=r["text"], id=r["id"], category=r["category"], label="harmful", split="heldout")
                for r in self.json("filter", "heldout.json")]

    def direction(self) -> tuple[torch.Tensor, int]:
        """The unit refusal direction r̂(l*) and l*."""
        t = read_tensors(self.path("direction", "direction.safetensors"))
        return t["direction"], int(self.store.recorded("direction")["summary"]["layer"])

    def direction_vector(self) -> torch.Tensor:
        """The unnormalised difference in means r(l*) (what ActAdd adds)."""
        return read_tensors(self.path("direction", "direction.safetensors"))["vector"]

    # ----------------------------------------------------------------- stages 1-3
    def stage1(self) -> dict[str, LadderRecord]:
        return {r["id"]: LadderRecord.from_json(r) for r in self.jsonl("stage1", "results.jsonl")}

    def stage1_ranked(self) -> dict[int, torch.Tensor]:
        """Per Stage 1 layer, latent indices by cos(r̂, W_dec[i]), descending."""
        t = read_tensors(self.path("stage1", "ranked.safetensors"))
        return {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("index.")}

    def stage1_sets(self) -> dict[str, FeatureSet]:
        """Per prompt Stage 1 jailbroke, its candidate set L_K (top-K* latents of every layer)."""
        ranked = self.stage1_ranked()
        return {pid: FeatureSet.from_layers({l: r[: rec.k].tolist() for l, r in ranked.items()})
                for pid, rec in self.stage1().items() if rec.k is not None}

    def stage1_features(self) -> FeatureSet:
        """Every latent of a Stage 1 set (the paper's "Stage 1 features", Table 4), sorted."""
        return FeatureSet(f for s in self.stage1_sets().values() for f in s).sorted()

    def stage2(self) -> dict[str, Stage2Record]:
        return {r["id"]: Stage2Record.from_json(r) for r in self.jsonl("stage2", "sets.jsonl")}

    def stage2_sets(self) -> dict[str, FeatureSet]:
        """Per jailbroken prompt, its Stage 2 set."""
        return {pid: r.set for pid, r in self.stage2().items() if r.set is not None}

    def active_stage2(self) -> dict[str, FeatureSet]:
        """Per jailbroken prompt, the latents of its Stage 2 set that fire on the plain prompt."""
        return {pid: r.active or FeatureSet() for pid, r in self.stage2().items() if r.set is not None}

    def per_tau(self) -> pd.DataFrame:
        """Stage 2 per prompt and τ: consensus-set size and whether it jailbreaks."""
        return self.table("stage2", "per_tau.parquet")

    def stage3(self) -> dict[str, Stage3Record]:
        return {r["id"]: Stage3Record.from_json(r) for r in self.jsonl("stage3", "results.jsonl")}

    def stage3_ranking(self, pid: str | None = None) -> list[tuple[Feature, float]]:
        """Latents by FM-embedding similarity to Stage 2 latents, descending: prompt `pid`'s own
        ranking, or (pid None) the global ranking of a run with `stage3.ranking: global`."""
        if pid is not None:
            return self.stage3_rankings().get(pid, [])
        if not self.has("stage3", "ranking.parquet"):
            raise UserError(f"{self.root} ranked Stage 3 latents per prompt (stage3.ranking: per_prompt): "
                            "pass a prompt id, or read stage3_rankings()")
        t = self.table("stage3", "ranking.parquet")
        return [(Feature.of(f), float(s)) for f, s in zip(t["feature"], t["similarity"])]

    def stage3_rankings(self) -> dict[str, list[tuple[Feature, float]]]:
        """Per prompt of Stage 3, the ranking its K ladder took latents from (with a global
        ranking, the same list for every prompt)."""
        if self.has("stage3", "rankings.parquet"):
            t = self.table("stage3", "rankings.parquet").sort_values(["id", "rank"], kind="stable")
            out: dict[str, list[tuple[Feature, float]]] = {}
            for pid, f, s in zip(t["id"], t["feature"], t["score"]):
                out.setdefault(str(pid), []).append((Feature.of(f), float(s)))
            return out
        shared = self.stage3_ranking()
        return {pid: shared for pid in self.stage3()}

    def stage3_sets(self) -> dict[str, FeatureSet]:
        """Per prompt jailbroken in Stage 3, the top-K* latents of its ranking."""
        rankings = self.stage3_rankings()
        return {pid: FeatureSet(f for f, _ in rankings.get(pid, [])[: r.k])
                for pid, r in self.stage3().items() if r.k}

    def probe_vs_fm(self) -> pd.DataFrame:
        """Jailbroken prompts per K with the linear probe's vs the FM's top-K latents."""
        return self.table("stage3", "probe_vs_fm.parquet")

    def critical_features(self) -> FeatureSet:
        """Every latent of a Stage 2 or Stage 3 set, in (layer, index) order."""
        feats = [f for s in self.stage2_sets().values() for f in s]
        if self.done("stage3"):
            feats += [f for s in self.stage3_sets().values() for f in s]
        return FeatureSet(feats).sorted()

    # ----------------------------------------------------------------- analyses
    def woken_at_bos(self) -> FeatureSet:
        """Dormant Stage 2 latents that woke up on the BOS token once the active set was ablated."""
        wake = self.json("hydra", "wake_up.json")
        return FeatureSet(w["feature"] for r in wake["records"] for w in r["woken"]
                          if any(h["region"] == "bos" for h in w["firings"])).sorted()

    def wake_up(self) -> dict:
        """Hydra step 3: per prompt, the dormant latents that woke up and where they fired."""
        return self.json("hydra", "wake_up.json")

    def inactive_critical(self) -> dict:
        """Hydra: jailbreaks with the full / active-only / inactive-only Stage 2 set per prompt."""
        return self.json("hydra", "inactive_critical.json")

    def stage3_only(self) -> dict:
        """Ablating only Stage 3 latents: {summary, records (per prompt)}."""
        return self.json("stage3_only", "stage3_only.json")

    def random_control(self) -> dict:
        """Random active latents per prompt and seed: {per_seed, records}."""
        return self.json("controls", "random_control.json")

    def obrien(self) -> dict:
        """O'Brien-style baseline: {per_k, records}."""
        return self.json("controls", "obrien.json")

    def ce_table(self) -> list[dict]:
        """Table 9 rows: dataset, setting, mean, std, n_texts."""
        return self.json("ce_loss", "table9.json")

    def clamping(self) -> list[dict]:
        """Tables 5/6 rows: prompt, clamp, response ([] when no latent woke up on BOS)."""
        return self.json("clamping", "clamping.json") if self.has("clamping", "clamping.json") else []

    # ----------------------------------------------------------------- semantics + dashboards
    def concepts(self) -> dict:
        """Concept groups per stage and top terms of the explanations (Tables 4, 7, 8, 10, 11)."""
        return self.json("semantics", "concepts.json")

    def prompt_tokens(self) -> dict[str, dict]:
        """Per refused prompt, its chat-formatted tokens and the region of each (bos, system,
        instruction, post_instruction)."""
        return {r["id"]: r for r in self.jsonl("dashboards", "prompt_tokens.jsonl")}

    def explanations(self) -> dict[str, str]:
        """Per critical latent, its explanation (Neuronpedia or the activation-based one)."""
        return dict(self.json("semantics", "explanations.json")["explanations"])

    def explanation_source(self) -> str:
        return self.json("semantics", "explanations.json")["source"]

    def category_activity(self) -> dict[str, dict[str, int]]:
        """Per critical latent, prompts of each unsafe category it fires on."""
        return self.json("taxonomy", "category_activity.json")

    def study_items(self) -> list[dict]:
        """The human-study sample: {feature, source, activation_labels, n_categories}."""
        return self.json("taxonomy", "study_items.json")

    def dashboards(self) -> dict:
        """Per latent with a dashboard, its LatentDashboard."""
        from ..methods.dashboards import LatentDashboard

        return {r["feature"]: LatentDashboard.from_json(r) for r in self.jsonl("dashboards", "dashboards.jsonl")}

    def dashboard_store(self):
        """Per latent its LatentDashboard, read lazily by byte offset (`dashboard_store.py`): what
        the report and the web app use, since a wide run has 10^4-10^5 dashboards."""
        from .dashboard_store import DashboardStore

        index = self.store.path("dashboards", "dashboards_index.json")
        return DashboardStore(self.path("dashboards", "dashboards.jsonl"), index)

    def model_summary(self) -> dict:
        """Model size and per-layer SAE width, architecture, L0 and dead share."""
        return self.json("dashboards", "model.json")

    def fm_embeddings(self) -> tuple[list[Feature], torch.Tensor]:
        """The Stage 3 FM's columns and their embeddings V [columns, k]."""
        t = read_tensors(self.path("stage3", "fm.safetensors"))
        return [Feature(int(l), int(i)) for l, i in t["columns"].reshape(-1, 2).tolist()], t["V"]

    def figure(self, stage: str, name: str) -> Path | None:
        """A plot a stage saved (PNG), or None when it is not there."""
        return self.path(stage, name) if name.endswith(".png") and self.has(stage, name) else None

    # ----------------------------------------------------------------- eval (`refusalscope eval`)
    def eval_table(self) -> pd.DataFrame:
        """One row per (intervention, dataset, part): n, refusal_rate, jailbreak_rate,
        degenerate_rate, mean_p_refusal, kl (plain ‖ intervened, next token), judges; general
        text rows (part "text") carry ce and ce_delta instead."""
        return self.table("eval", "cells.parquet")

    def eval_interventions(self) -> list[dict]:
        """The evaluated rows: name, kind, size, latents ("layer-index"), per-layer counts, clamp,
        seed, category, matched core (random rows), same_as (rows sharing identical latents)."""
        return self.json("eval", "interventions.json")["rows"]

    def eval_notes(self) -> list[str]:
        """Rows and datasets left out of the eval, and why."""
        return self.json("eval", "interventions.json")["notes"]

    def eval_completions(self) -> list[dict]:
        """Per (intervention, dataset, prompt): reply, verdict, which judge decided, P(I), KL."""
        return self.jsonl("eval", "completions.jsonl")

    def eval_by_category(self) -> pd.DataFrame:
        """Jailbreak rate per intervention and unsafe category on the run's harmful prompts."""
        return pd.DataFrame(self.json("eval", "by_category.json"))

    def eval_figures(self) -> dict[str, Path]:
        """The eval's figures that exist: heatmap, tradeoff (refusal vs side effects), core_curve."""
        return {n: self.path("eval", f"{n}.png") for n in ("heatmap", "tradeoff", "core_curve")
                if self.has("eval", f"{n}.png")}
