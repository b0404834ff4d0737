"""One declaration per stage (run/stages.py): every stage the runner knows has its inputs, runner
and tasks there, every task a stage fans out is declared by it, and every stage but the filter
has a report section. Adding a stage that misses one of these fails here, not in a user's run."""

from __future__ import annotations

import inspect
import re

from refusalscope.interfaces.views import SECTIONS
from refusalscope.run import runner
from refusalscope.run.config import ANALYSES
from refusalscope.run.stages import CORE, ORDER, STAGES, TASKS


def test_the_pipeline_order_is_the_papers():
    assert CORE == ("filter", "direction", "stage1", "stage2", "stage3")
    assert [s.name for s in ORDER if s.kind == "analysis"] == list(ANALYSES)
    assert [s.name for s in ORDER][-2:] == ["dashboards", "eval"]
    assert runner.STAGES is STAGES


def test_every_task_a_stage_fans_out_is_declared_by_that_stage():
    for stage in ORDER:
        source = inspect.getsource(inspect.getmodule(stage.run))
        fanned = set(re.findall(r'fan_out\(ctx, "(\w+)"', source))
        module_stages = [s for s in ORDER if inspect.getmodule(s.run) is inspect.getmodule(stage.run)]
        declared = {t for s in module_stages for t in s.tasks}
        assert fanned == declared, f"{stage.name}'s module fans out {fanned}, its stages declare {declared}"
        assert all(TASKS[t] is fn for t, fn in stage.tasks.items())
    assert len(TASKS) == sum(len(s.tasks) for s in ORDER), "two stages declare a task of the same name"


def test_every_stage_but_the_filter_has_a_report_section():
    shown = {need for _, _, needs, _ in SECTIONS for need in needs}
    assert set(STAGES) - shown == {"filter"}


def test_a_stage_reads_only_stages_before_it():
    names = list(STAGES)
    for s in ORDER:
        for dep in (*s.inputs.deps, *s.inputs.optional):
            assert names.index(dep) < names.index(s.name), (s.name, dep)
