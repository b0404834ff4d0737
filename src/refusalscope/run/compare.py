"""Compare two run directories: is a resumed (or re-run, or Ray-run) result the same as another?

Every artifact a stage registered, the saved config and the mean-difference cache must be byte-identical
(stores write deterministic bytes: sorted safetensors headers, Parquet and PNG without timestamps).
The manifest must hold equal values once the fields that record when and how a stage ran are set
aside (times, durations, which backend ran how many shards). A checkpoint (`*.partial.jsonl`)
must hold the same final record per key (a shard redone after a kill appends its records again).
The lock file and temp files of interrupted writes are not results and are skipped, but a temp
file left in a finished run is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import TMP_MARK, read_jsonl
from .annotations import FILE as STUDY_DB
from .lock import LOCK_NAME

VOLATILE_STAGE = ("started", "finished", "seconds", "executed")
VOLATILE_SUMMARY = ("seconds",)


def manifest_values(path: Path) -> dict:
    m = json.loads(Path(path).read_text(encoding="utf-8"))
    for entry in m.get("stages", {}).values():
        for k in VOLATILE_STAGE:
            entry.pop(k, None)
        for k in VOLATILE_SUMMARY:
            (entry.get("summary") or {}).pop(k, None)
    return m


def _records(path: Path) -> dict:
    out = {}
    for r in read_jsonl(path):
        key = r.get("id", r.get("key"))
        out[json.dumps(key)] = r
    return out


def _files(root: Path) -> set[str]:
    """Result files: not the lock, nor the annotation study's database (answers, not results)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.name != LOCK_NAME and not p.name.startswith(STUDY_DB)}


def compare_runs(a: str | Path, b: str | Path, stages: list[str] | None = None) -> list[str]:
    """Differences between runs `a` and `b`, one line each; empty when they hold the same results.
    With `stages`, only those stages' folders and manifest entries are compared."""
    a, b = Path(a), Path(b)
    diffs: list[str] = []
    files_a, files_b = _files(a), _files(b)
    if stages is not None:
        keep = lambda f: f == "manifest.json" or f.split("/")[0] in stages  # noqa: E731
        files_a, files_b = {f for f in files_a if keep(f)}, {f for f in files_b if keep(f)}
    for name in sorted(files_a ^ files_b):
        diffs.append(f"{name}: only in {a if name in files_a else b}")
    for name in sorted(files_a & files_b):
        pa, pb = a / name, b / name
        if TMP_MARK in pa.name and pa.name.startswith("."):
            diffs.append(f"{name}: temp file of an interrupted write left behind")
        elif name == "manifest.json":
            va, vb = manifest_values(pa), manifest_values(pb)
            if stages is not None:
                va, vb = ({"stages": {s: v["stages"].get(s) for s in stages}} for v in (va, vb))
            if va != vb:
                stages = sorted(s for s in set(va["stages"]) | set(vb["stages"])
                                if va["stages"].get(s) != vb["stages"].get(s))
                other = sorted(k for k in set(va) | set(vb) if k != "stages" and va.get(k) != vb.get(k))
                diffs.append(f"manifest.json: values differ (stages {stages}, fields {other})")
        elif name.endswith(".partial.jsonl"):
            if _records(pa) != _records(pb):
                diffs.append(f"{name}: checkpoint records differ")
        elif pa.read_bytes() != pb.read_bytes():
            diffs.append(f"{name}: bytes differ")
    return diffs
