"""Chain the stages of a run in pipeline order: the one entry point the CLI and the Python API
share. Each stage skips itself when its config hash is already done, so running again resumes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..artifacts import atomic_write_text
from ..errors import UserError
from .config import Config, dump_config, load_config
from .pipeline import Context, run_filter
from .stage3 import run_stage3
from .stage_analyses import ANALYSIS_STAGES
from .stage_direction import run_direction
from .stage_eval import run_eval
from .stage_search import run_stage1, run_stage2
from .store import RunStore

STAGES: dict[str, Callable[[Context], dict]] = {
    "filter": run_filter, "direction": run_direction, "stage1": run_stage1, "stage2": run_stage2,
    "stage3": run_stage3, **ANALYSIS_STAGES, "eval": run_eval}
CORE = ("filter", "direction", "stage1", "stage2", "stage3")


def printer(quiet: bool, stream=None) -> Callable[[str], None]:
    """A log function: one line per message, nothing when quiet."""
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=stream or sys.stdout, flush=True)
    return log


def open_context(config: str | os.PathLike | Config | None = None, run_dir: str | os.PathLike | None = None,
                 overrides: dict | None = None, quiet: bool = False, log: Callable[[str], None] | None = None) -> Context:
    """The Context of a run: its config (a preset name, YAML file or Config; default demo), its run
    directory (default runs/<config name>), with the resolved config saved beside the manifest."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    root = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    store = RunStore(root)
    atomic_write_text(root / "config.yaml", dump_config(cfg))
    return Context(cfg, store, quiet=quiet, log=log or printer(quiet))


def run_pipeline(ctx: Context, upto: str = "analyses", only: list[str] | None = None) -> dict:
    """Run the stages in order up to `upto` (a stage name, or "analyses" for everything); the
    analyses run are `only`, else the config's `analyses.run`. Returns {stage: summary, "run": dir}."""
    if upto != "analyses" and upto not in STAGES:
        raise UserError(f"unknown stage {upto!r}: use one of {', '.join(STAGES)} or analyses")
    order = list(CORE)
    if upto == "analyses":
        names = only or ctx.cfg.analyses.run
        bad = [n for n in names if n not in ANALYSIS_STAGES]
        if bad:
            raise UserError(f"unknown analysis {bad[0]!r}: choose from {', '.join(ANALYSIS_STAGES)}")
        order += [n for n in ANALYSIS_STAGES if n in names]
    elif upto not in CORE:
        order.append(upto)
    out: dict = {}
    try:
        for name in order:
            out[name] = STAGES[name](ctx)
            if name == upto:
                break
    finally:
        ctx.close()
    out["run"] = str(ctx.store.root)
    return out
