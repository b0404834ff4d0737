"""The run store: a directory of artifacts plus a manifest of which stage produced what.

Every write goes to a temporary name in the same folder and is renamed into place, so a killed
process never leaves a half-written artifact. The manifest records, per stage, the hash of the
config it ran with, its status and timings; a stage whose hash matches and whose status is
"done" is skipped on the next run, anything else is recomputed.

A writer takes the directory's lock (`run.lock`, see `lock.py`) and checks the manifest's version
stamp: a run written in another run format, or by another major.minor release of refusalscope, is
refused with a message saying what differs, so results of two versions never mix silently.
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

from .. import __version__
from ..artifacts import (
    TMP_MARK,
    Checkpoint,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_table,
    atomic_write_tensors,
    atomic_write_text,
    config_hash,
    digest_mismatch,
    disk_full,
    file_digest,
    read_json,
    read_jsonl,
    read_table,
    read_tensors,
)
from ..errors import UserError
from .lock import RunLock

RUN_FORMAT = 1  # bump when the layout or meaning of a run directory's files changes

__all__ = ["Checkpoint", "RunStore", "StageRecord", "atomic_write_json", "atomic_write_jsonl",
           "atomic_write_table", "atomic_write_tensors", "atomic_write_text", "config_hash", "read_json",
           "read_jsonl", "read_table", "read_tensors"]


def rebuild_command(stage: str) -> str:
    """The CLI command that (re)runs `stage`."""
    if stage in ("filter", "direction", "stage1", "stage2", "stage3", "eval"):
        return stage
    return f"analyze {stage}"


class RunStore:
    """A run directory: `manifest.json` plus artifacts in per-stage subfolders."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if not create and not (self.root / "manifest.json").exists():
            raise UserError(f"no run found at {self.root} (no manifest.json): run `refusalscope run` into it first, "
                            "or pass the directory a run wrote")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the run directory {self.root} ({err.strerror or err}): "
                            "pass a folder you can write with -r") from None
        self.manifest_path = self.root / "manifest.json"
        try:
            self.manifest = read_json(self.manifest_path) if self.manifest_path.exists() else {"stages": {}}
            self.manifest.setdefault("stages", {})
        except (ValueError, AttributeError):
            raise UserError(f"{self.manifest_path} is not a refusalscope manifest (not valid JSON): pass "
                            "another run directory (-r), or move this one away to start afresh") from None
        fmt = self.manifest.get("run_format")
        if fmt is not None and fmt != RUN_FORMAT:
            raise UserError(f"run directory {self.root} is in run format {fmt} (refusalscope "
                            f"{self.manifest.get('refusalscope', '?')}), this refusalscope {__version__} uses "
                            f"format {RUN_FORMAT}: use refusalscope {self.manifest.get('refusalscope', '?')} "
                            "for it, or rerun into a new directory (-r)")
        self.lock: RunLock | None = None

    # ----------------------------------------------------------------- writing
    def open_for_writing(self, accept_version: bool = False, log=print) -> RunStore:
        """Take the directory's lock, check the version stamp, drop temp files a killed writer
        left behind, and stamp the manifest with this version."""
        try:
            probe = self.root / f".write-probe-{os.getpid()}{TMP_MARK}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            if disk_full(err):
                raise UserError(f"no space left on the disk of {self.root}: free space and run the same "
                                "command again (finished work is kept)") from None
            raise UserError(f"run directory {self.root} is not writable ({err.strerror or err}): "
                            "pass a folder you can write with -r") from None
        self._check_is_run()
        self.lock = RunLock(self.root)
        self.lock.acquire(log)
        try:
            self._check_version(accept_version, log)
            self._drop_orphans()
            self._save()
        except BaseException:
            self.close()
            raise
        return self

    def _check_is_run(self) -> None:
        """A folder that holds files but no manifest is someone's own folder, not a run: writing a
        run into it would mix the two (a run killed before its first manifest leaves only these)."""
        if self.manifest_path.exists():
            return
        own = {"run.lock", "config.yaml"}
        other = sorted(p.name for p in self.root.iterdir() if p.name not in own and TMP_MARK not in p.name)
        if other:
            raise UserError(f"{self.root} holds files that are not a run ({', '.join(other[:3])}"
                            f"{', …' if len(other) > 3 else ''}): pass a new or empty folder with -r")

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_version(self, accept: bool, log) -> None:
        m = self.manifest
        theirs = m.get("refusalscope")
        if m["stages"] and theirs != __version__:
            what = (f"was written by refusalscope {theirs}" if theirs else
                    "has no version stamp (written before refusalscope 0.1.0 stamped its runs)")
            if theirs is None or theirs.split(".")[:2] != __version__.split(".")[:2]:
                if not accept:
                    raise UserError(f"run directory {self.root} {what}, this is {__version__}: rerun into a "
                                    "new directory (-r), or pass --accept-version to keep its finished stages")
                log(f"run {self.root} {what}; continuing with {__version__} (--accept-version): finished "
                    "stages are kept, stages whose inputs changed rerun")
            else:
                log(f"run {self.root} {what}; continuing with {__version__} (same major.minor)")
        history = list(m.get("written_by") or ([theirs or "unstamped"] if m["stages"] else []))
        if __version__ not in history:
            history.append(__version__)
        m.update(run_format=RUN_FORMAT, refusalscope=__version__, written_by=history)

    def _drop_orphans(self) -> None:
        """Temp files of atomic writes interrupted by a kill: never renamed, never read."""
        for p in self.root.rglob(f".*{TMP_MARK}*"):
            if p.is_file():
                p.unlink()

    def path(self, stage: str, name: str) -> Path:
        return self.root / stage / name

    def status(self, stage: str) -> dict | None:
        return self.manifest["stages"].get(stage)

    def recorded(self, stage: str) -> dict:
        """The manifest entry of a stage known to have run (checked by `is_done`, or read before)."""
        s = self.status(stage)
        assert s is not None, f"stage {stage!r} has no manifest entry"
        return s

    def is_done(self, stage: str, chash: str) -> bool:
        """Finished with this config hash, its artifacts as it wrote them (a damaged one reruns it)."""
        s = self.status(stage)
        return bool(s and s.get("status") == "done" and s.get("config_hash") == chash
                    and all((self.root / a).exists() for a in s.get("artifacts", [])) and not self.damaged(stage))

    def damaged(self, stage: str) -> list[tuple[Path, str]]:
        """The artifacts of a finished stage that differ from what it wrote, each with why."""
        sums = (self.status(stage) or {}).get("checksums") or {}
        return [(self.root / rel, why) for rel, (size, sha) in sums.items()
                if (why := digest_mismatch(self.root / rel, size, sha))]

    def mismatch(self, stage: str, path: Path, why: str) -> UserError:
        return UserError(f"{path} is not the file the {stage} stage wrote ({why}): "
                         f"`refusalscope {rebuild_command(stage)} -r {self.root}` rebuilds it")

    def verify_all(self) -> None:
        """Every finished stage's artifacts as written (what `compare` checks before it compares)."""
        for stage, entry in self.manifest["stages"].items():
            if entry.get("status") == "done":
                for path, why in self.damaged(stage)[:1]:
                    raise self.mismatch(stage, path, why)

    def verify(self, stage: str, name: str) -> Path:
        """The artifact `name` of `stage` as the stage wrote it, or a one-line error naming the file and
        the command that rebuilds it (files of runs written before checksums are taken as they are)."""
        path = self.path(stage, name)
        sums = (self.status(stage) or {}).get("checksums") or {}
        rel = path.relative_to(self.root).as_posix()
        if rel in sums:
            why = digest_mismatch(path, *sums[rel])
            if why:
                raise self.mismatch(stage, path, why)
        return path

    def rerecord(self, rels: Iterable[str]) -> None:
        """Record artifacts edited after their stage finished (tools that derive a run from another:
        benchmarks, fixtures) as that stage would have, so readers verify the new bytes."""
        for rel in rels:
            self.manifest["stages"][rel.split("/")[0]].setdefault("checksums", {})[rel] = \
                list(file_digest(self.root / rel))
        self._save()

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
            self._failed(entry, t0)
            raise
        artifacts = sorted(set(rec.artifacts))
        entry.update(status="done", finished=time.time(), seconds=round(time.perf_counter() - t0, 3),
                     artifacts=artifacts, checksums={a: list(file_digest(self.root / a)) for a in artifacts},
                     summary=rec.summary,
                     **({"executed": rec.executed} if rec.executed else {}))
        try:
            self._save()
        except BaseException:  # interrupted while recording the finish: the file on disk still says running
            self._failed(entry, t0)
            raise

    def _failed(self, entry: dict, t0: float) -> None:
        """Mark the stage failed on disk (the next run reruns it, from its checkpoints)."""
        entry["status"] = "failed"
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        try:
            self._save()
        except (OSError, UserError):  # a full disk: the earlier manifest stays, the error below says why
            pass


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
