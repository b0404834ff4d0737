"""Smoke tests of the GPU-sized benchmark at tiny sizes: the script a lent GPU runs must work
before it gets there (no timing is asserted: speed lives in benchmarks/, not in tests)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_shapes():
    spec = importlib.util.spec_from_file_location("bench_shapes", ROOT / "benchmarks" / "bench_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_shapes_small_reports_every_mode_and_size(tmp_path):
    out = tmp_path / "b4.json"
    res = _bench_shapes().main(["--small", "--arch", "llama-3.1-8b", "--d-sae", "128", "--dtype", "float32",
                                "--device", "cpu", "--sizes", "3", "9", "--repeats", "1", "--batch", "4",
                                "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert [(r["mode"], r["S_per_layer"]) for r in res["rows"]] == \
        [("plain", 0), ("sparse", 3), ("reference", 3), ("sparse", 9), ("reference", 9)]
    assert all(r["median_s"] > 0 for r in res["rows"]) and res["layers"] == 4
    assert all("reference_over_sparse" in r for r in res["rows"] if r["mode"] == "reference")


def test_gpu_script_says_what_is_missing_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the script runs the real benchmark instead")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr and "--small" in res.stderr
