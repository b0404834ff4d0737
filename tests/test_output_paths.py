"""Every output path is checked before the work that fills it: the shared check itself, and the
benchmarks' --out (argparse's one error line, exit 2, before any benchmark work)."""

import subprocess
import sys
from pathlib import Path

import pytest

from refusalscope.artifacts import check_writable
from refusalscope.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_check_writable_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "b" / "report.html"
    assert check_writable(out, "-o") == out
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []  # the probe is gone, no file yet


@pytest.mark.parametrize("where, said", [
    ("/proc/1/forbidden/x.json", "cannot write /proc/1/forbidden/x.json ("),
    ("{tmp}", "{tmp} is a folder: pass a file path with --out"),
    ("{tmp}/file/x.json", "cannot write {tmp}/file/x.json (")])
def test_check_writable_names_the_path_and_the_option(tmp_path, where, said):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(UserError) as err:
        check_writable(where.format(tmp=tmp_path), "--out")
    assert str(err.value).startswith(said.format(tmp=tmp_path)) and "\n" not in str(err.value)


def test_benchmark_out_is_checked_before_it_runs(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_runs.py"), str(tmp_path / "a"),
                          str(tmp_path / "b"), "--out", "/proc/1/forbidden/compare.json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].endswith(
        "error: argument --out: cannot write /proc/1/forbidden/compare.json (No such file or directory): pass a "
        "path you can write with --out")
    assert "Traceback" not in res.stderr
