"""Stage hashes over what each stage reads (its `StageInputs`, declared in its module): the config
fields, the prompt files (by content), the explanation bundles and the earlier stages.

A stage's hash covers exactly these, so a changed config reruns the stages whose inputs changed
and keeps the rest; `stage_hashes` computes every hash from the config alone (no model needed),
which lets the CLI say up front what will run and check `--no-deps`. Execution settings (backend,
workers, shard size) are in no hash: every backend gives the same results.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

from ..artifacts import config_hash
from ..errors import UserError
from .config import Config
from .stage_spec import Stage

EVAL_PARTS = ("heldout", "search", "harmless", "general")  # eval.datasets names that are not files


def config_value(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump() if isinstance(value, BaseModel) else value


_digests: dict[tuple, str] = {}


def prompt_digest(spec: str, text_field: str | None) -> str:
    """Hash of a prompt set's parsed prompts (id, text, category, label, split): an edited file
    reruns what reads it, reformatting it does not. Memoised per file version."""
    from .resolve import load_prompt_set

    p = Path(spec)
    stamp: tuple[int, ...] = ()
    if not spec.startswith("bundled:"):
        try:
            st = os.stat(p)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            return "missing"
    key = (spec, text_field, stamp)
    if key not in _digests:
        try:
            prompts = load_prompt_set(spec, text_field)
        except UserError:
            return "unreadable"
        _digests[key] = config_hash([(q.id, q.text, q.category, q.subcategory, q.label, q.split) for q in prompts])
    return _digests[key]


_bundle_digests: dict[tuple, str] = {}


def bundle_digest(spec: str | None) -> str | None:
    """Hash of a Neuronpedia bundle's contents: each file's sha256 with its path inside the bundle
    folder (file order decides which explanation wins), not where the bundle lies, so moving it
    reruns nothing and editing it reruns what reads it. None when no bundle is set."""
    if spec is None:
        return None
    from ..artifacts import file_digest
    from ..methods.np_bundle import bundle_files

    try:
        files = bundle_files(spec)
    except UserError:
        return "missing"  # preflight says why, in one line
    root = Path(spec).expanduser()
    parts = []
    for f in files:
        st = os.stat(f)
        key = (str(f), st.st_size, st.st_mtime_ns)
        if key not in _bundle_digests:
            _bundle_digests[key] = file_digest(f)[1]
        parts.append((f.relative_to(root).as_posix() if root.is_dir() else "", _bundle_digests[key]))
    return config_hash(parts)


def files_of(cfg: Config, key: str) -> list[str]:
    """The prompt sets a `files` field names (eval.datasets: NAME=PATH gives PATH; the run's own
    parts are not files)."""
    value = config_value(cfg, key)
    specs = [] if value is None else [value] if isinstance(value, str) else list(value)
    if key == "eval.datasets":
        specs = [s.split("=", 1)[1] if "=" in s else s for s in specs if s not in EVAL_PARTS]
    return specs


def _model_identity(cfg: Config) -> dict:
    if cfg.model.source == "demo":  # the demo world is keyed by its recipe: a new recipe is a new model
        from ..demo.recipe import DemoRecipe, recipe_hash

        return {"demo_world": recipe_hash(DemoRecipe())}
    return {}


def stage_hashes(cfg: Config, stages: Mapping[str, Stage], names=None) -> dict[str, str]:
    """The hash of every stage of `stages` (or of `names` and what they depend on) for this config."""
    out: dict[str, str] = {}
    runs = {*(n for n, s in stages.items() if s.kind == "core"), *cfg.analyses.run}

    def one(name: str) -> str:
        if name not in out:
            spec = stages[name].inputs
            keys = {k: config_value(cfg, k) for k in spec.keys}
            if "model" in spec.keys:
                keys["model_identity"] = _model_identity(cfg)
            files: dict[str, list[str | None]] = {
                k: [prompt_digest(f, cfg.data.text_field) for f in files_of(cfg, k)] for k in spec.files}
            files.update({k: [bundle_digest(config_value(cfg, k))] for k in spec.bundles})
            deps = [*spec.deps, *(d for d in spec.optional if d in runs)]
            out[name] = config_hash({"stage": name, "cfg": keys, "files": files, "deps": {d: one(d) for d in deps}})
        return out[name]

    for n in names or stages:
        one(n)
    return out


def needed(stages: Mapping[str, Stage], names) -> list[str]:
    """`names` and every stage they depend on, in pipeline order."""
    seen: set[str] = set()

    def walk(n: str) -> None:
        if n not in seen:
            seen.add(n)
            for d in stages[n].inputs.deps:
                walk(d)

    for n in names:
        walk(n)
    return [n for n in stages if n in seen]
