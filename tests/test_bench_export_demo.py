"""benchmarks/export_demo.py, the script the lead runs on the demo run, smoke-tested on the tiny run:
it runs tests/test_export_demo.py against the run it is given (so those tests also run in CI here,
two of them) and keeps pytest's verdict per test as JSON."""

import json

import pytest
from bench_scripts import load_benchmark


def _bench():
    return load_benchmark("export_demo")


def test_export_demo_runs_the_demo_tests_on_the_run_it_is_given(tiny_run, tmp_path):
    res = _bench().main([str(tiny_run), "-k", "tables or neuronpedia", "--out", str(tmp_path)])
    assert json.loads((tmp_path / f"{tiny_run.name}.json").read_text()) == res
    assert res["run"] == str(tiny_run.resolve()) and res["returncode"] == 0
    assert {c["test"]: c["outcome"] for c in res["tests"]} == {
        "test_neuronpedia_bodies_validate_and_local_saes_get_a_note": "passed",
        "test_tables_parse_and_are_the_runs_tables": "passed"}
    assert res["counts"] == {"passed": 2, "failed": 0, "error": 0, "skipped": 0}
    assert "2 passed" in (tmp_path / f"{tiny_run.name}.txt").read_text()


def test_export_demo_says_when_the_path_holds_no_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"export_demo: no run found at {tmp_path}")
    assert not (tmp_path / "out").exists()
