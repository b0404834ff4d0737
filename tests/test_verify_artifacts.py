"""Finished artifacts are verified when read: the manifest records each one's size and sha256, and
a copy cut short or changed in place is one line naming the file and the command that rebuilds it
(report, compare, every reader), while a pipeline command reruns the stage that wrote it, logged.
A torn last line is tolerated in checkpoints only."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from refusalscope.artifacts import read_jsonl
from refusalscope.errors import UserError
from refusalscope.interfaces.cli import app
from refusalscope.run.compare import compare_runs
from refusalscope.run.results import RunResults
from refusalscope.run.store import read_json


def test_a_torn_last_line_is_tolerated_in_checkpoints_only(tmp_path):
    text = '{"id": 1}\n{"id": 2}\n{"id": 3, "x": [1, 2'
    (tmp_path / "items.partial.jsonl").write_text(text)
    (tmp_path / "sets.jsonl").write_text(text)
    assert [r["id"] for r in read_jsonl(tmp_path / "items.partial.jsonl")] == [1, 2]
    with pytest.raises(UserError, match=r"sets.jsonl line 3 is not complete JSON: the file is damaged"):
        read_jsonl(tmp_path / "sets.jsonl")


def test_the_manifest_records_size_and_sha256_of_every_artifact(tiny_run):
    import hashlib

    for stage, entry in read_json(tiny_run / "manifest.json")["stages"].items():
        assert sorted(entry["checksums"]) == entry["artifacts"], stage
        for rel, (size, sha) in entry["checksums"].items():
            data = (tiny_run / rel).read_bytes()
            assert size == len(data) and sha == hashlib.sha256(data).hexdigest()


@pytest.fixture
def cut(tiny_run, tmp_path):
    """A copy of the finished tiny run whose stage2/sets.jsonl was cut in half mid-line."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    sets = run / "stage2" / "sets.jsonl"
    data = sets.read_bytes()
    half = len(data) // 2 - (data[len(data) // 2 - 1] == ord("\n")) * 5  # mid-line
    sets.write_bytes(data[:half])
    return run, len(data), half


def _said(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_report_and_compare_name_the_damaged_file_and_the_command(tiny_run, cut):
    run, size, half = cut
    want = (f"error: {run}/stage2/sets.jsonl is not the file the stage2 stage wrote ({half} bytes, written as "
            f"{size}): `refusalscope stage2 -r {run}` rebuilds it")
    assert _said(CliRunner().invoke(app, ["report", str(run), "-q"])) == want
    assert _said(CliRunner().invoke(app, ["compare", str(tiny_run), str(run)])) == want
    assert not (run / "report.html").exists()


def test_same_size_other_bytes_is_caught_by_the_sha256(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    kept = run / "filter" / "kept.json"
    data = bytearray(kept.read_bytes())
    i = data.index(b'"text"') + 1
    data[i] = ord("T")  # "Text": still valid JSON of the same size, another field name
    kept.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        RunResults(run).kept_prompts()
    assert str(err.value) == (f"{kept} is not the file the filter stage wrote (its sha256 differs from the one "
                              f"recorded): `refusalscope filter -r {run}` rebuilds it")


def test_a_pipeline_command_reruns_the_stage_that_wrote_it(tiny_world, tiny_run, cut):
    run = cut[0]
    res = CliRunner().invoke(app, ["run", "-c", str(tiny_world / "cfg.yaml"), "-r", str(run)])
    assert res.exit_code == 0, res.output
    assert re.search(rf"{re.escape(str(run))}/stage2/sets.jsonl is not the file stage2 wrote \(\d+ bytes, "
                     r"written as \d+\): stage2 runs again", res.stdout), res.stdout
    assert compare_runs(tiny_run, run) == []  # rebuilt byte for byte; later stages kept
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["hydra"]["finished"] == read_json(tiny_run / "manifest.json")["stages"]["hydra"]["finished"]
