"""Chain the stages of a run in pipeline order: the one entry point the CLI and the Python API
share. Each stage skips itself when its config hash is already done, so running again resumes;
the run directory is locked while a run writes to it, and every input is checked before the first
stage starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..artifacts import atomic_write_text
from ..errors import UserError
from .config import Config, _merge, config_from_dict, dump_config, load_config
from .inputs import needed, stage_hashes
from .pipeline import Context
from .preflight import preflight
from .stages import CORE, RUNNABLE_ANALYSES, STAGES
from .store import RunStore


def printer(quiet: bool, stream=None) -> Callable[[str], None]:
    """A log function: one line per message, nothing when quiet."""
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=stream or sys.stdout, flush=True)
    return log


def open_context(config: str | os.PathLike | Config | None = None, run_dir: str | os.PathLike | None = None,
                 overrides: dict | None = None, quiet: bool = False, log: Callable[[str], None] | None = None,
                 accept_version: bool = False, unrecorded: dict | None = None) -> Context:
    """The Context of a run: its config (a preset name, YAML file or Config; without one, the
    config.yaml an earlier command saved in `run_dir`, else demo), its run directory (default
    runs/<config name>) locked for this process and checked for its version
    (`RunStore.open_for_writing`). `unrecorded` overrides apply to this command only (eval's
    dataset choice): they never reach the run's config.yaml, which `run_pipeline` writes when a
    stage runs (`save_record`). Close the context (`run_pipeline` does) to release the lock."""
    log = log or printer(quiet)
    saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
    if config is None and saved is not None and saved.is_file():
        config = str(saved)
        log(f"config: {saved} (the run's own; pass -c to use another)")
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    record = dump_config(cfg)
    if unrecorded:
        cfg = config_from_dict(_merge(cfg.model_dump(), unrecorded), "command-line options")
    root = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    return Context(cfg, RunStore(root).open_for_writing(accept_version, log), quiet=quiet, log=log, record=record,
                   stages=STAGES)


def save_record(ctx: Context, todo: list[str]) -> None:
    """A run's config.yaml says how its results were made, so it is written when the run has none
    and when a stage (eval aside: it records its choice in eval/) is about to run with a config
    that differs from it; a command that only reads, or only evaluates, leaves it as it was."""
    path = ctx.store.root / "config.yaml"
    if ctx.record is None:
        return
    if not path.exists() or (any(n != "eval" for n in todo) and path.read_text(encoding="utf-8") != ctx.record):
        atomic_write_text(path, ctx.record)


def check_analyses(names) -> None:
    bad = [n for n in names or () if n not in RUNNABLE_ANALYSES]
    if bad:
        raise UserError(f"unknown analysis {bad[0]!r}: choose from {', '.join(RUNNABLE_ANALYSES)}")


def plan(ctx: Context, upto: str = "analyses", only: list[str] | None = None,
         no_deps: bool = False) -> tuple[list[str], list[str]]:
    """(the stages to go through in order, those of them already done with this config). With
    `no_deps`, only the asked stages, and the ones they need must be done."""
    if upto != "analyses" and upto not in STAGES:
        raise UserError(f"unknown stage {upto!r}: use one of {', '.join(STAGES)} or analyses")
    analyses = list(only or [*ctx.cfg.analyses.run, *(["dashboards"] if ctx.cfg.dashboards.run else [])])
    check_analyses(analyses)
    if no_deps:
        asked = analyses if upto == "analyses" else [upto]
    else:
        asked = ([*CORE, *analyses] if upto == "analyses" else
                 list(CORE[:CORE.index(upto) + 1]) if upto in CORE else [*CORE, upto])
    names = needed(STAGES, asked)
    hashes = stage_hashes(ctx.cfg, STAGES)
    ctx.hashes.update(hashes)  # the stages hash what plan resolved, once
    done = [n for n in names if ctx.store.is_done(n, hashes[n])]
    for n in names:
        entry = ctx.store.status(n) or {}
        if n not in done and entry.get("status") == "done" and entry.get("config_hash") == hashes[n]:
            for path, why in ctx.store.damaged(n)[:1]:
                ctx.log(f"{path} is not the file {n} wrote ({why}): {n} runs again")
    if no_deps:
        missing = [n for n in names if n not in asked and n not in done]
        if missing:
            raise UserError(f"{asked[0]} needs {missing[-1]}, which has not finished in {ctx.store.root} with this "
                            f"config: run `refusalscope {missing[-1]}` first, or drop --no-deps")
        names = [n for n in names if n in asked]
    return names, [n for n in names if n in done]


def run_pipeline(ctx: Context, upto: str = "analyses", only: list[str] | None = None,
                 no_deps: bool = False) -> dict:
    """Run the stages in order up to `upto` (a stage name, or "analyses" for everything); the
    analyses run are `only`, else the config's `analyses.run`, with the stages they need. Every
    input of the stages still to run is checked first (`preflight`), so a mistake costs seconds.
    Returns {stage: summary, "run": dir}."""
    out: dict = {}
    try:
        names, done = plan(ctx, upto, only, no_deps)
        todo = [n for n in names if n not in done]
        if todo:
            preflight(ctx, todo)
        save_record(ctx, todo)
        ctx.log(f"run {ctx.store.root}: " + (f"{', '.join(done)} done; " if done else "")
                + (f"running {', '.join(todo)}" if todo else "nothing to run"))
        for name in names:
            out[name] = STAGES[name].run(ctx)
            if ctx._saes is not None:  # each stage reads the SAE layers it needs again
                ctx._saes.release()
            if name == "filter" and out[name]["n_kept"] == 0 and len(names) > 1:
                raise UserError(
                    f"nothing to dissect: the model refused none of the {out[name]['n_in']} harmful "
                    f"prompts (judge {ctx.cfg.judge.name}; replies in {ctx.store.root}/filter/"
                    "completions.jsonl): check data.harmful_test and the judge, or use a safety-tuned model"
                )
    finally:
        ctx.close()
    out["run"] = str(ctx.store.root)
    return out
