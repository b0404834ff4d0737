"""Rows: `refusalscope export` (formats, sets, output folders, interventions)."""

from __future__ import annotations

import shutil

from .core import Case, Row, edit_json


def ref_link(c: Case) -> None:
    (c.tmp / "ref").symlink_to(c.extra["reference"], target_is_directory=True)


def ref_without_stage3(c: Case) -> None:
    shutil.copytree(c.extra["reference"], c.tmp / "ref")
    edit_json(c.tmp / "ref" / "manifest.json", lambda m: m["stages"].pop("stage3"))


def no_direction(c: Case) -> None:
    shutil.copytree(c.extra["reference"], c.tmp / "run")
    (c.tmp / "run" / "direction" / "direction.safetensors").unlink()


GROUPS: dict[str, list[Row]] = {
    "export": [
        Row("export-format", "export to an unknown format", "export {tmp}/ref --to excel",
            "unknown export format 'excel': use one of {*}", ref_link, given="refusalscope export runs/x --to excel"),
        Row("export-set", "export of a set the run does not have", "export {tmp}/ref --to saelens --sets stage9",
            "unknown set 'stage9': use stage1, stage2, stage3, core@K or a prompt id with a Stage 2 set ({*})", ref_link,
            given="--sets stage9"),
        Row("export-core", "core set of a size that is not a whole number", "export {tmp}/ref --to saelens --sets core@x",
            "bad set 'core@x': write core@K with K a whole number >= 1, e.g. core@8", ref_link, given="--sets core@x"),
        Row("export-no-stage", "export of a stage the run has not finished", "export {tmp}/ref --to lm-eval --sets stage3",
            "{tmp}/ref has no finished stage3: run it first (refusalscope run -r {tmp}/ref) or pick other --sets",
            ref_without_stage3, given="runs/x without Stage 3"),
        Row("export-out", "export into a folder that cannot be created", "export {tmp}/ref --to tables -o /proc/1/forbidden",
            "cannot create /proc/1/forbidden ({*}): pass a writable folder for -o", ref_link, given="-o /proc/1/forbidden"),
        Row("export-intervention", "export with an intervention it does not know", "export {tmp}/ref --to saelens "
            "--intervention clamp=big", "bad intervention 'clamp=big': use ablate, clamp=VALUE or scale=FACTOR", ref_link,
            given="--intervention clamp=big"),
        Row("export-model-no-direction", "abliterated model export from a run without its refusal direction",
            "export {run} --to model -o {tmp}/abl",
            "{run}/direction/direction.safetensors is missing: run the `direction` stage first (refusalscope run -r {run})",
            no_direction, given="a run whose direction stage has not run"),
    ],
}
