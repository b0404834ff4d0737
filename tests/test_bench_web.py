"""Smoke test of the web load benchmark (B9) at a small size on a real tiny run: no errors, no
lost annotation. Latency is reported by the benchmark, never asserted here."""

import json
from pathlib import Path

from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_bench_web_small_loses_nothing(tiny_run, tmp_path):
    mod = load_benchmark("bench_web")
    out = tmp_path / "b6.json"
    res = mod.main(["--run", str(tiny_run), "--clients", "4", "--requests", "60", "--annotations", "12",
                    "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["errors"] == 0 and res["annotations_answered"] == 12 and res["annotation_rows"] == 12
    assert len({k for k in res["latency_ms"]}) == 2 and res["latency_ms"]["read"]["p50"] > 0
    if (tiny_run / "annotations.sqlite").exists():  # the run's own study store is left alone
        from refusalscope.run.annotations import AnnotationStore

        assert not any(a.startswith("bench") for a in AnnotationStore.of_run(tiny_run).annotators())
