"""Artifact files, usable from every layer: atomic writes (a temp file in the target folder,
renamed into place, so a killed process never leaves half a file behind), tolerant reads, an
append-only JSONL checkpoint for resumable loops, and the stable hash of config sections. Equal
contents give equal bytes (resumed runs are compared byte for byte), and a full disk ends in a
one-line error that leaves every earlier file as it was."""

from __future__ import annotations

import errno
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

from .errors import UserError

if TYPE_CHECKING:
    from .run.store import StageRecord

TMP_MARK = ".tmp"  # temp files are ".<name>.<random>.tmp<suffix>": a run store removes orphans
_UMASK = os.umask(0o022)  # read once: mkstemp makes 0600 files, artifacts get the usual 0666 & ~umask
os.umask(_UMASK)


def disk_full(err: BaseException) -> bool:
    """Whether `err` (an OSError, or a library's wrapper of one) means no space or quota left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def disk_full_error(path: Path, err: BaseException) -> UserError:
    return UserError(f"no space left on the disk of {Path(path).parent} while writing {Path(path).name} "
                     f"({type(err).__name__}): free space and run the same command again (finished work is kept)")


def check_writable(path: str | os.PathLike, option: str) -> Path:
    """Fail now, in one line, if `path` cannot be written (its folder is created when missing): every
    output path of every command is checked before the work that fills it starts."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: pass a file path with {option}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", suffix=TMP_MARK, dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if disk_full(err):
            raise disk_full_error(path, err) from None
        raise UserError(f"cannot write {path} ({err.strerror or type(err).__name__}): pass a path you can "
                        f"write with {option}") from None
    return path


def writable_arg(value: str) -> Path:
    """argparse `type=` of the benchmarks' --out: an unwritable path stops the script before it works."""
    import argparse

    try:
        return check_writable(value, "--out")
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_MARK + path.suffix, dir=path.parent)
    except OSError as err:
        if disk_full(err):
            raise disk_full_error(path, err) from None
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after writing: a writer that replaces the file (safetensors) resets it
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(err):
            raise disk_full_error(path, err) from None
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
    return atomic_write(path, lambda tmp: save_tensors(tensors, tmp, meta))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """`safetensors.save_file` with the header's metadata in sorted order: safetensors writes it
    in hash-map order, which changes from process to process, so equal tensors gave unequal files."""
    save_file(tensors, str(path), metadata=metadata or None)
    if metadata and len(metadata) > 1:
        with open(path, "r+b") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) <= n:  # same keys, same length; pad as safetensors does
                f.seek(8)
                f.write(text + b" " * (n - len(text)))


def atomic_write_table(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: Path, torn_ok: bool | None = None) -> list[dict]:
    """Records of a JSONL file. A torn last line (a process killed mid-append) is dropped only in a
    checkpoint (`*.partial.jsonl`, or `torn_ok`); in a finished artifact it means a damaged file."""
    path = Path(path)
    torn_ok = path.name.endswith(".partial.jsonl") if torn_ok is None else torn_ok
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and torn_ok:
                break
            raise UserError(f"{path} line {i + 1} is not complete JSON: the file is damaged (a bad copy or a "
                            "full disk): write it again, or rerun the command that wrote it") from None
    return out


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file: what the manifest records for each finished artifact."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return os.path.getsize(path), h.hexdigest()


_MATCHED: set[tuple] = set()  # (path, size, mtime, sha256) found intact in this process


def digest_mismatch(path: str | os.PathLike, size: int, sha256: str) -> str | None:
    """Why `path` is not the file recorded as (size, sha256), or None when it is. The size is
    checked on every call, the content once per process per version of the file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "it is missing"
    if st.st_size != size:
        return f"{st.st_size} bytes, written as {size}"
    key = (str(path), st.st_size, st.st_mtime_ns, sha256)
    if key not in _MATCHED:
        if file_digest(path)[1] != sha256:
            return "its sha256 differs from the one recorded"
        _MATCHED.add(key)
    return None


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
            for r in read_jsonl(self.path, torn_ok=True):
                self.records[r[key]] = r
            atomic_write_jsonl(self.path, self.records.values())  # drop a torn tail

    def __contains__(self, item) -> bool:
        return item in self.records

    def add(self, record: dict) -> None:
        """Append one record, unless its item is already done (work redone after a kill gives the
        same values, and the file keeps one line per item); a torn line left by a kill or a full
        disk is dropped on reopening."""
        if record[self.key] in self.records:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=_jsonable) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if disk_full(err):
                raise disk_full_error(self.path, err) from None
            raise
        self.records[record[self.key]] = record

    def __len__(self) -> int:
        return len(self.records)
