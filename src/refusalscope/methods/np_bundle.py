"""Neuronpedia's explanation exports read offline: the `explanations/batch-N.jsonl.gz` files of its
dataset exports (its per-SAE explanation endpoint is gone), one JSON row per explanation with
`modelId`, `layer` (the SAE source id, e.g. "12-gemmascope-res-65k"), `index` and `description`
(utils/neuronpedia-utils export-data.py, 2026-08). The semantics stage and the dashboards read them
before asking the API, so a real preset runs offline with Neuronpedia's explanations."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UserError
from ..interventions.features import Feature


def bundle_files(path: str | os.PathLike) -> list[Path]:
    """The .jsonl.gz / .jsonl files of a bundle: the file itself, or every one under a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.name.endswith((".jsonl.gz", ".jsonl")))
        if files:
            return files
        raise UserError(f"{p} holds no .jsonl.gz or .jsonl files: pass Neuronpedia's explanations folder or one of "
                        "its batch files (analyses.neuronpedia_bundle)")
    raise UserError(f"Neuronpedia bundle {p} does not exist: pass an explanations/*.jsonl.gz file or its folder "
                    "(analyses.neuronpedia_bundle)")


def _rows(f: Path) -> Iterator[dict]:
    opener = gzip.open if f.name.endswith(".gz") else open
    try:
        with opener(f, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{f} line {n} is not JSON: pass Neuronpedia's explanations "
                                        "export as downloaded") from None
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {f} ({err}): pass Neuronpedia's explanations export as downloaded") from None


def _layer_of(row: dict, template: str | None) -> int | None:
    """Our layer for a row: from `template` ("gemma-2-2b/{layer}-gemmascope-res-65k") when given, so
    rows of other models or SAE widths are skipped; else the number the source id starts with."""
    source = str(row.get("layer", ""))
    head = source.split("-", 1)[0]
    if not head.isdigit():
        return None
    layer = int(head)
    if template is not None:
        model, _, src = template.replace("{layer}", str(layer)).partition("/")
        if row.get("modelId") != model or source != src:
            return None
    return layer


def read_explanations(path: str | os.PathLike, features: Iterable, template: str | None = None) -> dict[str, str]:
    """{"layer-index": description} for the wanted `features` found in the bundle (the first
    non-empty description of each, in file order)."""
    wanted = {Feature.of(f) for f in features}
    out: dict[str, str] = {}
    for f in bundle_files(path):
        for row in _rows(f):
            layer = _layer_of(row, template)
            desc = str(row.get("description") or "").strip()
            if layer is None or not desc or not str(row.get("index", "")).isdigit():
                continue
            feat = Feature(layer, int(row["index"]))
            if feat in wanted and feat.id not in out:
                out[feat.id] = desc
    return out
