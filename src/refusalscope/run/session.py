"""A run store fed from memory, so that the Python API runs the pipeline's own stage functions.

`rs.stage1` / `rs.stage3` take a model, SAEs, prompts and earlier results as Python objects; a
Session writes those into a run store (a scratch folder unless the caller names one) in the
files the stages read (filter/kept.json, direction/direction.safetensors, stage2/sets.jsonl) and
then calls `run_stage1` / `run_stage3` themselves: the same code, config defaults and numbers as
`refusalscope run`, and whatever later changes those stages get, the API gets too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_write_jsonl
from ..errors import UserError
from ..methods.records import Stage2Record
from .config import Config, load_config
from .pipeline import Context, stage_hash
from .results import RunResults
from .stages import STAGES
from .store import RunStore


def api_config(config: Any = None, **sections: dict) -> Config:
    """The Config an API call runs with: `config` (a Config, preset name or YAML file; None: the
    demo preset, what the CLI runs without -c) with `sections` {section: {field: value}} set."""
    cfg = config if isinstance(config, Config) else load_config(config)
    changes = {k: v for k, v in sections.items() if v}
    if not changes:
        return cfg
    data = cfg.model_dump()
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    return Config.model_validate(data)


class Session:
    """A Context over a scratch run store with the caller's model, SAEs and judge already loaded."""

    def __init__(self, model, saes, judge, cfg: Config, run_dir: str | os.PathLike | None = None,
                 quiet: bool = True):
        self._tmp = None if run_dir is not None else tempfile.mkdtemp(prefix="refusalscope-api-")
        self.root = Path(run_dir) if run_dir is not None else Path(self._tmp or "")
        store = RunStore(self.root).open_for_writing(log=lambda _: None)
        self.ctx = Context(cfg, store, quiet=quiet, log=(lambda _: None) if quiet else print,
                           _model=model, _saes=saes, _judge=judge, stages=STAGES)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def results(self) -> RunResults:
        return self.ctx.results

    def put_prompts(self, pairs: Sequence[tuple[str, str]]) -> None:
        """The refused prompts Stages 1-3 dissect (the filter stage's kept.json)."""
        ids = [pid for pid, _ in pairs]
        if len(set(ids)) != len(ids):
            raise UserError("prompt ids repeat: give each prompt its own id")
        with self.ctx.store.stage("filter", stage_hash(self.ctx, "filter")) as st:
            st.json("kept.json", [{"id": pid, "text": text, "category": None} for pid, text in pairs])
            st.json("heldout.json", [])
            st.summary = {"n_in": len(pairs), "n_kept": len(pairs), "n_search": len(pairs), "n_heldout": 0}

    def put_direction(self, direction: torch.Tensor, layer: int, vector: torch.Tensor | None = None) -> None:
        """r̂(l*) and l* (the direction stage's direction.safetensors and summary)."""
        d = direction.detach().float().flatten()
        with self.ctx.store.stage("direction", stage_hash(self.ctx, "direction")) as st:
            st.tensors("direction.safetensors", {"direction": d / d.norm().clamp_min(1e-12),
                                                 "vector": (vector if vector is not None else d).detach().float()},
                       metadata={"layer": int(layer)})
            st.summary = {"layer": int(layer)}

    def put_stage2(self, records: Sequence[Stage2Record]) -> None:
        """Stage 2's per-prompt sets (stage2/sets.jsonl)."""
        with self.ctx.store.stage("stage2", stage_hash(self.ctx, "stage2")) as st:
            st.jsonl("sets.jsonl", [r.to_json() for r in records])
            st.summary = {"jailbroken": sum(r.set is not None for r in records)}

    def prompt_file(self, name: str, texts: Sequence[str]) -> str:
        """Texts as a prompt file stages read by path (one JSON line per prompt: any text works)."""
        path = self.root / "inputs" / f"{name}.jsonl"
        atomic_write_jsonl(path, [{"instruction": t} for t in texts])
        return str(path)

    def run(self, stage: str) -> dict:
        """Run one pipeline stage on what was put in; its summary."""
        return STAGES[stage].run(self.ctx)
