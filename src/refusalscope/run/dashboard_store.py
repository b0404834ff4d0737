"""Latent dashboards read one at a time: a run at the paper's width has 10^4-10^5 of them
(hundreds of MB of dashboards.jsonl), so the report and the web app look a latent up by its byte
offset instead of parsing the whole file per process or per request.

The `dashboards` stage writes the offset index (`dashboards_index.json`: per latent its offset,
length and the few numbers the latent browser sorts and filters by) beside the JSONL; for a run
written before the index existed, the store builds the same index in memory with one streaming
pass (nothing is written from a reader).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..methods.dashboards import sink_flagged


@dataclass(frozen=True)
class DashboardMeta:
    """What the browser needs of a latent's dashboard without reading it."""

    offset: int
    length: int
    cos: float | None
    density: float
    sink: bool
    explanation: str | None

    def to_json(self) -> list:
        return [self.offset, self.length, self.cos, self.density, self.sink, self.explanation]


def _meta(offset: int, line: bytes) -> tuple[str, DashboardMeta]:
    d = json.loads(line)
    n_tokens = int(d.get("n_tokens") or 0)
    density = int(d.get("n_nonzero") or 0) / n_tokens if n_tokens else 0.0
    sink = sink_flagged(int(d.get("bos_texts") or 0), float(d.get("sink_share") or 0.0))
    return d["feature"], DashboardMeta(offset, len(line), d.get("cos_direction"), density, sink, d.get("explanation"))


def build_index(jsonl: Path) -> dict[str, DashboardMeta]:
    """One streaming pass over dashboards.jsonl: per latent its offset, length and browser fields."""
    out: dict[str, DashboardMeta] = {}
    with open(jsonl, "rb") as fh:
        offset = 0
        for line in fh:
            if line.strip():
                fid, meta = _meta(offset, line)
                out[fid] = meta
            offset += len(line)
    return out


def index_json(jsonl: Path) -> dict:
    """The index file's content: the JSONL's size (a stale index is detected) and the rows."""
    return {"size": jsonl.stat().st_size, "rows": {f: m.to_json() for f, m in build_index(jsonl).items()}}


class DashboardStore(Mapping):
    """{latent id: LatentDashboard}, read lazily by offset (a few recent ones kept)."""

    def __init__(self, jsonl: Path, index: Path | None = None, keep: int = 256):
        self.path = Path(jsonl)
        self.meta = self._load_index(index)
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._keep = keep

    def _load_index(self, index: Path | None) -> dict[str, DashboardMeta]:
        if not self.path.exists():
            raise UserError(f"{self.path} is missing: rerun `refusalscope dashboards` for this run")
        if index is not None and index.exists():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                if data.get("size") == self.path.stat().st_size:
                    return {f: DashboardMeta(int(o), int(n), c, float(d), bool(s), e)
                            for f, (o, n, c, d, s, e) in data["rows"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable or stale: rebuilt below, in memory
        return build_index(self.path)

    def __getitem__(self, fid: str):
        from ..methods.dashboards import LatentDashboard

        if fid in self._cache:
            self._cache.move_to_end(fid)
            return self._cache[fid]
        m = self.meta[fid]  # KeyError for a latent without a dashboard
        with open(self.path, "rb") as fh:
            fh.seek(m.offset)
            board = LatentDashboard.from_json(json.loads(fh.read(m.length)))
        self._cache[fid] = board
        if len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return board

    def __contains__(self, fid: object) -> bool:
        return fid in self.meta

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)


class NoDashboards(Mapping):
    """The store of a run without the dashboards stage: empty."""

    meta: dict[str, DashboardMeta] = {}

    def __getitem__(self, fid: str):
        raise KeyError(fid)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0
