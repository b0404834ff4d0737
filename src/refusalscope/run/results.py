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
        return p

    def has(self, stage: str, name: str) -> bool:
        return self.store.path(stage, name).exists()

    def json(self, stage: str, name: str) -> Any:
        return read_json(self.path(stage, name))

    def jsonl(self, stage: str, name: str) -> list[dict]:
        return read_jsonl(self.path(stage, name))

    def table(self, stage: str, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(stage, name))

    def config_text(self) -> str | None:
        p = self.root / "config.yaml"
        return p.read_text(encoding="utf-8") if p.exists() else None

    # ----------------------------------------------------------------- filter + direction
    def kept_prompts(self) -> list[Prompt]:
        """The refused harmful test prompts the filter stage kept (the prompts dissected)."""
        return [Prompt(text=r["text"], id=r["id"], category=r["category"], label="harmful")
                for r in self.json("filter", "kept.json")]

    def direction(self) -> tuple[torch.Tensor, int]:
        """The unit refusal direction r̂(l*) and l*."""
        t = read_tensors(self.path("direction", "direction.safetensors"))
        return t["direction"], int(self.store.status("direction")["summary"]["layer"])

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
