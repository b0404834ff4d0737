"""Ctrl-C (SIGINT) and SIGTERM in the middle of a real pipeline process on the planted tiny world:
one line saying how to resume, exit 130 / 143, the run lock released, no temp file left, every stage
either done or marked failed; the same command then finishes a run identical to an uninterrupted
one (artifacts byte for byte, manifests minus timings)."""

from __future__ import annotations

import json

import pytest
from faults import run_cli

from refusalscope.run.compare import compare_runs

SAID = {130: "error: interrupted (SIGINT): run the same command again to resume (finished work is kept)",
        143: "error: interrupted (SIGTERM): run the same command again to resume (finished work is kept)"}


def _interrupted(world, trial, fault: str, code: int) -> None:
    proc = run_cli(fault, "run", "-c", str(world / "cfg.yaml"), "-r", str(trial), "-q")
    assert proc.returncode == code, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [SAID[code]]
    assert (trial / "run.lock").read_bytes() == b""  # released: an empty record is a clean release
    assert not list(trial.rglob(".*.tmp*")), "a temp file was left behind"
    stages = json.loads((trial / "manifest.json").read_text())["stages"]
    # no stage left "running": the interrupted one (if the signal came inside a stage) says failed
    assert all(e["status"] in ("done", "failed") for e in stages.values())


@pytest.mark.parametrize("points", [
    # (fault, share of the uninterrupted run's writes or appends); the second interrupt comes early in
    # the resumed process (its count starts again from 1)
    [("int@write", 0.15), ("term@append", 0.0)],
    [("term@write", 0.6), ("int@write", 0.0)],
], ids=["sigint-write-then-sigterm-append", "sigterm-write-then-sigint-write"])
def test_interrupted_run_ends_in_one_line_and_resumes_to_the_same_result(tiny_world, tiny_reference, tmp_path,
                                                                        points):
    ref, counts = tiny_reference
    trial = tmp_path / "trial"
    for spec, share in points:
        n = max(2, int(counts[spec.split("@")[1]] * share))
        _interrupted(tiny_world, trial, f"{spec}:{n}", 130 if spec.startswith("int") else 143)
    resumed = run_cli("count:/dev/null", "run", "-c", str(tiny_world / "cfg.yaml"), "-r", str(trial), "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert compare_runs(ref, trial) == []
    assert (trial / "run.lock").read_bytes() == b""


def test_interrupt_while_the_manifest_records_a_finished_stage_marks_it_failed(tiny_world, tiny_reference, tmp_path):
    """The third manifest write of `filter` is the one that records the stage done (after the opening
    stamp and the "running" entry): SIGTERM inside it leaves the stage marked failed, never running,
    and the same command then finishes it as an uninterrupted run does."""
    ref, _ = tiny_reference
    trial = tmp_path / "trial"
    cmd = ("filter", "-c", str(tiny_world / "cfg.yaml"), "-r", str(trial), "-q")
    proc = run_cli("term@write:3~manifest.json", *cmd)
    assert proc.returncode == 143, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [SAID[143]]
    assert json.loads((trial / "manifest.json").read_text())["stages"]["filter"]["status"] == "failed"
    assert (trial / "filter" / "kept.json").exists()  # the stage's work was all there
    assert run_cli("count:/dev/null", *cmd).returncode == 0
    assert compare_runs(ref, trial, stages=["filter"]) == []
