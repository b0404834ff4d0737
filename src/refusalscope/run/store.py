"""The run store: a directory of artifacts plus a manifest of which stage produced what.

Every write goes to a temporary name in the same folder and is renamed into place, so a killed
process never leaves a half-written artifact. The manifest records, per stage, the hash of the
config it ran with, its status and timings; a stage whose hash matches and whose status is
"done" is skipped on the next run, anything else is recomputed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..artifacts import (
    Checkpoint,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_table,
    atomic_write_tensors,
    atomic_write_text,
    config_hash,
    read_json,
    read_jsonl,
    read_table,
    read_tensors,
)
from ..errors import UserError

__all__ = ["Checkpoint", "RunStore", "StageRecord", "atomic_write_json", "atomic_write_jsonl",
           "atomic_write_table", "atomic_write_tensors", "atomic_write_text", "config_hash", "read_json",
           "read_jsonl", "read_table", "read_tensors"]


class RunStore:
    """A run directory: `manifest.json` plus artifacts in per-stage subfolders."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if not create and not (self.root / "manifest.json").exists():
            raise UserError(f"no run found at {self.root}: run `refusalscope run` first or pass --run")
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"
        self.manifest = read_json(self.manifest_path) if self.manifest_path.exists() else {"stages": {}}

    def path(self, stage: str, name: str) -> Path:
        return self.root / stage / name

    def status(self, stage: str) -> dict | None:
        return self.manifest["stages"].get(stage)

    def is_done(self, stage: str, chash: str) -> bool:
        s = self.status(stage)
        return bool(s and s.get("status") == "done" and s.get("config_hash") == chash
                    and all((self.root / a).exists() for a in s.get("artifacts", [])))

    def _save(self) -> None:
        atomic_write_json(self.manifest_path, self.manifest)

    @contextmanager
    def stage(self, name: str, chash: str, depends: dict[str, str] | None = None) -> Iterator[StageRecord]:
        """Record a stage run: status running → done (or failed), timings and artifacts."""
        prev = self.status(name) or {}
        if prev.get("config_hash") not in (None, chash):  # config changed: old partial work is stale
            for partial in (self.root / name).glob("*.partial.*"):
                partial.unlink()
        rec = StageRecord(self, name)
        entry = {"config_hash": chash, "status": "running", "started": time.time(),
                 "depends": depends or {}, "artifacts": []}
        self.manifest["stages"][name] = entry
        self._save()
        t0 = time.perf_counter()
        try:
            yield rec
        except BaseException:
            entry["status"] = "failed"
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            self._save()
            raise
        entry.update(status="done", finished=time.time(), seconds=round(time.perf_counter() - t0, 3),
                     artifacts=sorted(set(rec.artifacts)), summary=rec.summary,
                     **({"executed": rec.executed} if rec.executed else {}))
        self._save()


class StageRecord:
    """What a running stage writes: artifacts registered in the manifest, plus a summary dict."""

    def __init__(self, store: RunStore, stage: str):
        self.store, self.stage = store, stage
        self.artifacts: list[str] = []
        self.summary: dict = {}
        self.executed: dict = {}  # fanned-out task -> {backend, workers, shards}

    def _reg(self, path: Path) -> Path:
        self.artifacts.append(str(path.relative_to(self.store.root)))
        return path

    def json(self, name: str, obj: Any) -> Path:
        return self._reg(atomic_write_json(self.store.path(self.stage, name), obj))

    def jsonl(self, name: str, records: Iterable[dict]) -> Path:
        return self._reg(atomic_write_jsonl(self.store.path(self.stage, name), records))

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        return self._reg(atomic_write_tensors(self.store.path(self.stage, name), tensors, metadata))

    def table(self, name: str, frame: pd.DataFrame) -> Path:
        return self._reg(atomic_write_table(self.store.path(self.stage, name), frame))

    def file(self, name: str) -> Path:
        """Register a file the stage writes itself (e.g. a plot saved through a temp name)."""
        return self._reg(self.store.path(self.stage, name))

    def checkpoint(self, name: str = "items", key: str = "key") -> Checkpoint:
        return Checkpoint(self.store.path(self.stage, f"{name}.partial.jsonl"), key, owner=self)
