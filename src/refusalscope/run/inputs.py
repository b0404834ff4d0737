"""What each stage reads: the config fields, the prompt files (by content) and the earlier stages.

A stage's hash covers exactly these, so a changed config reruns the stages whose inputs changed
and keeps the rest; `stage_hashes` computes every hash from the config alone (no model needed),
which lets the CLI say up front what will run and check `--no-deps`. Execution settings (backend,
workers, shard size) are in no hash: every backend gives the same results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from ..artifacts import config_hash
from ..errors import UserError
from .config import ANALYSES, Config

PIPELINE = ("filter", "direction", "stage1", "stage2", "stage3")
_SAE_WEIGHTS = ("saes.source", "saes.release", "saes.sae_id", "saes.path", "saes.layers")


@dataclass(frozen=True)
class StageInputs:
    keys: tuple[str, ...]  # config sections or dotted fields the stage reads
    files: tuple[str, ...] = ()  # fields naming prompt sets, hashed by their parsed contents
    deps: tuple[str, ...] = ()  # stages whose artifacts it reads (their hashes chain in)
    optional: tuple[str, ...] = ()  # stages it reads when the config runs them (chained in then, never forced)
    bundles: tuple[str, ...] = ()  # fields naming Neuronpedia explanation bundles, hashed by their files' sha256


STAGES: dict[str, StageInputs] = {
    "filter": StageInputs(("model", "data.harmful_test", "data.text_field", "data.max_prompts",
                           "data.heldout_fraction", "judge", "generation", "seed"), ("data.harmful_test",)),
    "direction": StageInputs(("model", "data", "judge", "generation", "direction", "seed"),
                             ("data.harmful_train", "data.harmful_val", "data.harmless_train",
                              "data.harmless_val", "data.harmless_test"), ("filter",)),
    "stage1": StageInputs((*_SAE_WEIGHTS, "judge", "generation", "stage1"), (), ("direction",)),
    "stage2": StageInputs(("model.batch_size", "judge", "generation", "stage2"), (), ("stage1",)),
    "stage3": StageInputs(("model.batch_size", "data.text_field", "judge", "generation", "stage3", "seed"),
                          ("stage3.harmful", "stage3.harmless"),
                          ("stage2",)),
    "hydra": StageInputs(("model.batch_size", "judge", "generation", "analyses.wake_threshold", "seed"), (),
                         ("stage2",)),
    "stage3_only": StageInputs(("judge", "generation", "seed"), (), ("stage3",)),
    "controls": StageInputs(("judge", "generation", "analyses.random_seeds", "analyses.obrien_ks", "seed"), (),
                            ("stage2",)),
    "ce_loss": StageInputs(("model.batch_size", "data.text_field", "analyses.ce_instructions", "analyses.ce_general",
                            "analyses.ce_texts", "analyses.ce_sets", "seed"),
                           ("analyses.ce_instructions", "analyses.ce_general"),
                           ("stage2", "direction")),
    "taxonomy": StageInputs(("model.batch_size", "data.text_field", "analyses.taxonomy_prompts",
                             "analyses.taxonomy_field", "analyses.taxonomy_only", "analyses.taxonomy_sinks", "seed"),
                            ("analyses.taxonomy_prompts",), ("stage3",)),
    "clamping": StageInputs(("generation", "analyses.clamp_values", "analyses.clamp_prompts",
                             "analyses.clamp_tokens"), (), ("hydra",)),
    "semantics": StageInputs(("model.batch_size", "analyses.explain_texts", "analyses.neuronpedia_cache",
                              "analyses.neuronpedia_url", "saes.neuronpedia_id"),
                             (), ("stage3",), bundles=("analyses.neuronpedia_bundle",)),
    "dashboards": StageInputs(("dashboards", "model.batch_size", "data.text_field", "saes.neuronpedia_id",
                               "analyses.neuronpedia_cache", "seed"),
                              ("dashboards.corpus",), ("stage2",),
                              ("stage3", "hydra", "taxonomy", "semantics"), bundles=("analyses.neuronpedia_bundle",)),
    "eval": StageInputs(("model.batch_size", "data", "judge", "generation", "eval", "seed"),
                        ("eval.datasets", "eval.general_text"),
                        ("filter", "direction", "stage2", "stage3"), ("hydra",)),
}
LAST = ("dashboards", "eval")  # after every analysis, reading whichever ran; eval only when asked for
assert set(STAGES) == {*PIPELINE, *ANALYSES, *LAST}
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


def stage_hashes(cfg: Config, names=None) -> dict[str, str]:
    """The hash of every stage (or of `names` and what they depend on) for this config."""
    out: dict[str, str] = {}

    def one(name: str) -> str:
        if name not in out:
            spec = STAGES[name]
            keys = {k: config_value(cfg, k) for k in spec.keys}
            if "model" in spec.keys:
                keys["model_identity"] = _model_identity(cfg)
            files: dict[str, list[str | None]] = {
                k: [prompt_digest(f, cfg.data.text_field) for f in files_of(cfg, k)] for k in spec.files}
            files.update({k: [bundle_digest(config_value(cfg, k))] for k in spec.bundles})
            runs = {*PIPELINE, *cfg.analyses.run}
            deps = [*spec.deps, *(d for d in spec.optional if d in runs)]
            out[name] = config_hash({"stage": name, "cfg": keys, "files": files, "deps": {d: one(d) for d in deps}})
        return out[name]

    for n in names or STAGES:
        one(n)
    return out


def needed(names) -> list[str]:
    """`names` and every stage they depend on, in pipeline order."""
    seen: set[str] = set()

    def walk(n: str) -> None:
        if n not in seen:
            seen.add(n)
            for d in STAGES[n].deps:
                walk(d)

    for n in names:
        walk(n)
    return [n for n in (*PIPELINE, *ANALYSES, *LAST) if n in seen]
