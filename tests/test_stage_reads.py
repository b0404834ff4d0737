"""A stage's inputs cannot drift from what it reads: the whole tiny pipeline runs with the config
wrapped in a recorder that logs every field each stage reads, and each read must be listed in
that stage's declaration, its StageInputs (or the stage's hash would not change when the field
does, and a changed value would rerun nothing). Execution settings are in no hash by design; the model, SAEs, judge and
backend are built before the stages (whichever stage comes first builds them in a real run)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from refusalscope.run import runner
from refusalscope.run.stage_spec import Stage
from refusalscope.run.stages import STAGES, hashes


class Reads:
    """A read-only view of a config that logs the dotted path of every field read through it."""

    def __init__(self, obj: Any, path: str, log: set[str]):
        self._obj, self._path, self._log = obj, path, log

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        key = f"{self._path}.{name}" if self._path else name
        if isinstance(value, BaseModel):
            return Reads(value, key, self._log)
        if name == "section" and not self._path:  # cfg.section(*names): whole sections
            def section(*names):
                self._log.update(names)
                return value(*names)
            return section
        self._log.add(self._path or key if callable(value) else key)  # model_dump(): the whole section
        return value


def test_every_config_read_of_every_stage_is_listed_in_inputs(tiny_world, tmp_path, monkeypatch):
    ctx = runner.open_context(str(tiny_world / "cfg.yaml"), tmp_path / "run", quiet=True)
    cfg = ctx.cfg
    ctx.hashes.update(hashes(cfg))
    ctx.model, ctx.saes, ctx.judge, ctx.backend  # noqa: B018 - built from the plain config
    reads: dict[str, set[str]] = {}

    def recorded(s: Stage) -> Stage:
        name, fn = s.name, s.run

        def stage(c):
            c.cfg = Reads(cfg, "", reads.setdefault(name, set()))
            try:
                return fn(c)
            finally:
                c.cfg = cfg
        return Stage(name, s.kind, s.inputs, stage, s.tasks)

    monkeypatch.setattr(runner, "STAGES", {n: recorded(s) for n, s in runner.STAGES.items()})
    runner.run_pipeline(ctx, "analyses")
    assert set(reads) >= {"filter", "direction", "stage1", "stage2", "stage3", "hydra", "dashboards"}
    assert "stage3.n_tokens" in reads["stage3"] and "stage2.taus" in reads["stage2"]  # the recorder sees reads
    unlisted = {}
    for name, keys in reads.items():
        spec = STAGES[name].inputs
        listed = spec.keys + spec.files + spec.bundles
        bad = sorted(k for k in keys if not k.startswith("execution")
                     and not any(k == x or k.startswith(x + ".") for x in listed))
        if bad:
            unlisted[name] = bad
    assert not unlisted, f"stages read config fields their declarations do not list: {unlisted}"
