"""Every pipeline stage, in pipeline order: the one list the runner, hashing, preflight and the
backends read. Each declaration (`stage_spec.Stage`) lives in its stage's own module."""

from __future__ import annotations

from . import stage3, stage_analyses, stage_dashboards, stage_direction, stage_eval, stage_search
from .config import Config
from .inputs import needed, stage_hashes
from .pipeline import FILTER
from .stage_spec import Stage

ORDER: tuple[Stage, ...] = (FILTER, stage_direction.STAGE, stage_search.STAGE1, stage_search.STAGE2, stage3.STAGE,
                            *stage_analyses.STAGES, stage_dashboards.STAGE, stage_eval.STAGE)
STAGES: dict[str, Stage] = {s.name: s for s in ORDER}
TASKS = {task: fn for s in ORDER for task, fn in s.tasks.items()}
CORE = tuple(s.name for s in ORDER if s.kind == "core")
ANALYSIS_NAMES = tuple(s.name for s in ORDER if s.kind == "analysis")
# what `run` and `analyze` accept as an analysis: the paper's analyses and the dashboards
RUNNABLE_ANALYSES = (*ANALYSIS_NAMES, "dashboards")


def hashes(cfg: Config, names=None) -> dict[str, str]:
    """Every stage's hash (or those of `names` and what they depend on) for this config."""
    return stage_hashes(cfg, STAGES, names)


def with_deps(names) -> list[str]:
    """`names` and every stage they depend on, in pipeline order."""
    return needed(STAGES, names)

