"""One writer per run directory (run.lock), the version stamp, and temp files of killed writers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refusalscope import __version__
from refusalscope.errors import UserError
from refusalscope.interfaces.cli import app
from refusalscope.run.results import RunResults
from refusalscope.run.store import RUN_FORMAT, RunStore

SRC = Path(__file__).resolve().parents[1] / "src"
HOLD = ("import sys, time\nfrom refusalscope.run.store import RunStore\n"
        "RunStore(sys.argv[1]).open_for_writing()\nprint('locked', flush=True)\ntime.sleep(120)\n")


def hold(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_refuses_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, ["filter", "-r", str(run)])
        took = time.perf_counter() - t0
        assert res.exit_code == 2
        line = res.output.strip()
        assert line.startswith(f"error: run directory {run} is in use by pid {holder.pid} on {socket.gethostname()} "
                               "(started 20"), line
        assert line.endswith(": wait for it to finish or pass another run directory (-r)")
        assert took < 10  # before any model or prompt is loaded
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            RunStore(run).open_for_writing()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said: list[str] = []
    store = RunStore(run).open_for_writing(log=said.append)  # the kernel dropped the dead holder's flock
    assert said == [f"run {run}: taking over the lock left by pid {holder.pid} on {socket.gethostname()} "
                    f"(started {said[0].split('(started ')[1].split(')')[0]}), which is gone"]
    store.close()
    assert (run / "run.lock").read_text() == ""  # a clean release leaves no holder behind
    said.clear()
    RunStore(run).open_for_writing(log=said.append).close()
    assert said == []


def test_a_live_holder_is_recognised_where_flock_is_not_honoured(tmp_path, monkeypatch):
    """Some network filesystems ignore flock: the holder record (host, pid, start time) decides."""
    from refusalscope.run import lock

    run = tmp_path / "run"
    holder = hold(run)
    try:
        monkeypatch.setattr(lock.RunLock, "_flock", staticmethod(lambda fd: True))
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            RunStore(run).open_for_writing()
    finally:
        holder.kill()
        holder.wait()
    RunStore(run).open_for_writing(log=lambda m: None).close()  # dead pid: taken over


def _manifest(run: Path, **stamp) -> None:
    run.mkdir(parents=True, exist_ok=True)
    entry = {"config_hash": "x", "status": "done", "artifacts": [], "summary": {}}
    (run / "manifest.json").write_text(json.dumps({**stamp, "stages": {"filter": entry}}))


@pytest.mark.parametrize("stamp, says", [
    ({"run_format": RUN_FORMAT, "refusalscope": "0.2.0"}, "was written by refusalscope 0.2.0, this is " + __version__),
    ({}, "has no version stamp (written before refusalscope 0.1.0 stamped its runs), this is " + __version__),
])
def test_run_of_another_release_is_refused_unless_accepted(tmp_path, stamp, says):
    run = tmp_path / "run"
    _manifest(run, **stamp)
    res = CliRunner().invoke(app, ["filter", "-r", str(run)])
    assert res.exit_code == 2
    assert res.output.strip() == (f"error: run directory {run} {says}: rerun into a new directory (-r), or pass "
                                  "--accept-version to keep its finished stages")
    said: list[str] = []
    RunStore(run).open_for_writing(accept_version=True, log=said.append).close()
    assert len(said) == 1 and "(--accept-version): finished stages are kept" in said[0]
    m = json.loads((run / "manifest.json").read_text())
    assert m["refusalscope"] == __version__ and m["run_format"] == RUN_FORMAT
    assert m["written_by"] == [stamp.get("refusalscope", "unstamped"), __version__]
    assert m["stages"]["filter"]["status"] == "done"  # nothing was thrown away
    RunStore(run).open_for_writing(log=lambda m: pytest.fail(m)).close()  # now stamped: silent


def test_same_major_minor_continues_and_another_run_format_is_refused(tmp_path):
    run = tmp_path / "patch"
    major, minor, *_ = __version__.split(".")
    _manifest(run, run_format=RUN_FORMAT, refusalscope=f"{major}.{minor}.99")
    said: list[str] = []
    RunStore(run).open_for_writing(log=said.append).close()
    assert said == [f"run {run} was written by refusalscope {major}.{minor}.99; continuing with {__version__} "
                    "(same major.minor)"]
    run = tmp_path / "format"
    _manifest(run, run_format=RUN_FORMAT + 1, refusalscope="9.0.0")
    for attempt in (lambda: RunStore(run), lambda: RunResults(run)):
        with pytest.raises(UserError, match=f"is in run format {RUN_FORMAT + 1} .refusalscope 9.0.0."):
            attempt()
    res = CliRunner().invoke(app, ["filter", "-r", str(run), "--accept-version"])
    assert res.exit_code == 2 and "use refusalscope 9.0.0 for it, or rerun into a new directory" in res.output


def test_temp_files_of_a_killed_writer_are_dropped_when_a_writer_opens(tmp_path):
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "manifest.json").write_text('{"stages": {}}')  # a writer saves it before any stage
    orphan = run / "stage1" / ".results.jsonl.k2j3.tmp.jsonl"
    orphan.write_text('{"half": ')
    kept = run / "stage1" / "results.jsonl"
    kept.write_text("{}\n")
    RunStore(run).open_for_writing().close()
    assert not orphan.exists() and kept.exists()


@pytest.mark.parametrize("where", ["/proc/1/forbidden", "{tmp}/file/run"])
def test_unwritable_run_directory_is_one_line(tmp_path, where):
    (tmp_path / "file").write_text("x")
    where = where.format(tmp=tmp_path)
    res = CliRunner().invoke(app, ["filter", "-r", where])
    assert res.exit_code == 2 and len(res.output.splitlines()) == 1
    assert res.output.startswith(f"error: cannot create the run directory {where} (")
    assert res.output.strip().endswith("): pass a folder you can write with -r")
