"""Kill anywhere, resume, same result: the whole pipeline on the planted tiny world, as separate
processes run by `tests/faults.py`, SIGKILLed inside chosen writes, out of space, or out of
memory, then resumed with the same command and compared with an uninterrupted run (artifacts byte
for byte, manifests minus timings: run/compare.py). The long random sweep is
benchmarks/kill_sweep.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from faults import run_cli

from refusalscope.run.compare import compare_runs
from refusalscope.run.config import load_config
from refusalscope.run.stages import hashes as stage_hashes

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
KILLED = -signal.SIGKILL
cli = run_cli


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@pytest.fixture(scope="module")
def reference(tiny_reference):
    return tiny_reference


def test_kills_in_writes_and_appends_and_a_full_disk_then_resume_is_identical(world, reference):
    ref, counts = reference
    assert counts["write"] > 40 and counts["append"] > 20  # every stage writes through the patched paths
    trial = world / "trial"
    cmd = ("run", "-c", str(world / "cfg.yaml"), "-r", str(trial), "-q")

    killed = cli("kill@write:6", *cmd)  # inside the filter / direction writes
    assert killed.returncode == KILLED, killed.stderr
    assert list(trial.rglob(".*.tmp*")), "the kill left a half-written temp file"
    json.loads((trial / "manifest.json").read_text())  # the manifest was never half written

    killed = cli("kill@append:3", *cmd)  # inside a checkpoint line
    assert killed.returncode == KILLED, killed.stderr
    torn = [p for p in trial.rglob("*.partial.jsonl") if not p.read_text().endswith("\n")]
    assert torn, "the kill left a torn checkpoint line"

    before = {p: p.read_bytes() for p in trial.rglob("*") if p.is_file() and p.name != "run.lock"}
    full = cli("enospc@write:9", *cmd)  # the disk fills up later on
    assert full.returncode == 2
    assert len(errors(full)) == 1 and "no space left on the disk" in errors(full)[0], full.stderr
    assert "Traceback" not in full.stderr
    manifest = json.loads((trial / "manifest.json").read_text())
    done = [s for s, e in manifest["stages"].items() if e["status"] == "done"]
    assert done and compare_runs(ref, trial, stages=done) == []  # what finished before is intact
    assert all(p.read_bytes() == b for p, b in before.items() if p.exists() and p.suffix != ".jsonl"
               and p.name != "manifest.json")

    resumed = cli("count:/dev/null", *cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert compare_runs(ref, trial) == []
    assert not list(trial.rglob(".*.tmp*"))


def test_changed_config_reruns_exactly_the_stages_it_touches(world, reference):
    ref, _ = reference
    cfg = load_config(world / "cfg.yaml")
    manifest = json.loads((ref / "manifest.json").read_text())
    hashes = stage_hashes(cfg)
    assert set(manifest["stages"]) == set(hashes) - {"eval"}  # eval runs only when asked for
    assert {s: e["config_hash"] for s, e in manifest["stages"].items()} == {s: hashes[s] for s in manifest["stages"]}

    trial = world / "rerun"
    shutil.copytree(ref, trial)
    data = yaml.safe_load((world / "cfg.yaml").read_text())
    data["analyses"]["clamp_values"] = [2, 6]
    (world / "cfg2.yaml").write_text(yaml.safe_dump(data))
    proc = cli("count:/dev/null", "run", "-c", str(world / "cfg2.yaml"), "-r", str(trial))
    assert proc.returncode == 0, proc.stderr
    after = json.loads((trial / "manifest.json").read_text())["stages"]
    rerun = {s for s in after if after[s]["started"] != manifest["stages"][s]["started"]}
    assert rerun == {"clamping"}
    assert "done; running clamping" in proc.stdout


def test_out_of_memory_halves_the_batch_and_the_run_says_so(world, reference):
    ref, _ = reference
    trial = world / "oom"
    proc = cli("oom@rows:3", "filter", "-c", str(world / "cfg.yaml"), "-r", str(trial))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("out of memory in generate_full")]
    assert [line.split("halved to ")[1].split()[0] for line in lines] == ["4", "2"]
    assert (trial / "filter" / "kept.json").read_bytes() == (ref / "filter" / "kept.json").read_bytes()


def _unshare_works() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare and mount (user namespaces) for a small tmpfs")
def test_disk_full_on_a_small_filesystem_then_resume_after_freeing_space(world, reference, tmp_path):
    """A real full disk: the run directory on a 20 KiB tmpfs (in a private mount namespace), then
    the same command after the filesystem grows to 4 MiB."""
    ref, _ = reference
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    run = f"{sys.executable} -m refusalscope filter -c {world / 'cfg.yaml'} -r {mnt / 'run'} -q"
    script = (
        f"mount -t tmpfs -o size=20k tmpfs {mnt} && {{ {run} 2>{tmp_path / 'full.err'}; "
        f"echo $? > {tmp_path / 'full.rc'}; }}; mount -o remount,size=4m {mnt} && {run} && cp -a {mnt / 'run'} {out}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    stderr = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2"
    said = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: no space left on the disk"), stderr
    assert "Traceback" not in stderr
    assert compare_runs(ref, out, stages=["filter"]) == []
