"""What a pipeline stage is: one declaration per stage, next to its runner in the stage's own
module, saying what it reads (config fields, prompt files, bundles, earlier stages), the function
that runs it and the per-shard tasks its backend fans out. `stages.py` collects the declarations
in pipeline order; hashing (`inputs.py`), the runner, preflight and the backends all read them
from there, so adding a stage is writing its module and naming it once in `stages.py`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["core", "analysis", "last"]


@dataclass(frozen=True)
class StageInputs:
    """Everything a stage's hash covers: change one and the stage (and what reads it) reruns."""

    keys: tuple[str, ...]  # config sections or dotted fields the stage reads
    files: tuple[str, ...] = ()  # fields naming prompt sets, hashed by their parsed contents
    deps: tuple[str, ...] = ()  # stages whose artifacts it reads (their hashes chain in)
    optional: tuple[str, ...] = ()  # stages it reads when the config runs them (chained in then, never forced)
    bundles: tuple[str, ...] = ()  # fields naming Neuronpedia explanation bundles, hashed by their files' sha256


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. `kind`: core (Stages filter..3, always in order), analysis (chosen by
    `analyses.run`, any order after its deps) or last (after every analysis: dashboards, eval).
    `tasks`: per-shard work by name, run by a backend in this process or on a Ray worker
    (a task takes the worker's Context, a shard of items and a payload; it returns JSON records)."""

    name: str
    kind: Kind
    inputs: StageInputs
    run: Callable[[Any], dict]
    tasks: Mapping[str, Callable[[Any, list, dict], list[dict]]] = field(default_factory=dict)
