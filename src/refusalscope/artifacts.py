"""Artifact files, usable from every layer: atomic writes (a temp file in the target folder,
renamed into place, so a killed process never leaves half a file behind), tolerant reads, an
append-only JSONL checkpoint for resumable loops, and the stable hash of config sections."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from .run.store import StageRecord


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write)


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def atomic_write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))


def atomic_write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # views: own storage
    meta = {k: json.dumps(v, default=_jsonable) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def atomic_write_table(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (process killed mid-append) is ignored."""
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able config section."""
    text = json.dumps(obj, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Checkpoint:
    """Append-only JSONL of finished work items (one record per prompt), for resumable stages."""

    def __init__(self, path: Path, key: str = "key", owner: StageRecord | None = None):
        self.path = Path(path)
        self.key = key
        self.owner = owner  # the stage whose manifest entry says how its items were computed
        self.records: dict[Any, dict] = {}
        if self.path.exists():
            for r in read_jsonl(self.path):
                self.records[r[key]] = r
            atomic_write_jsonl(self.path, self.records.values())  # drop a torn tail

    def __contains__(self, item) -> bool:
        return item in self.records

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record[self.key]] = record

    def __len__(self) -> int:
        return len(self.records)
