"""Neuronpedia explanation bundles (explanations/*.jsonl.gz, rows as its export writes them; fixture in
tests/fixtures/neuronpedia) read offline into the semantics stage and the dashboards."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from refusalscope.errors import UserError
from refusalscope.interfaces.cli import app
from refusalscope.methods.np_bundle import read_explanations
from refusalscope.run.results import RunResults

BUNDLE = Path(__file__).parent / "fixtures" / "neuronpedia" / "explanations"
TEMPLATE = "tiny/{layer}-res-tiny"


def test_rows_of_other_models_and_saes_are_skipped_and_the_first_explanation_wins():
    got = read_explanations(BUNDLE, ["1-0", "1-1", "1-2", "1-104", "2-20", "2-45", "3-1"], TEMPLATE)
    assert got == {"1-0": "the letter b", "1-1": "refusing harmful requests", "1-2": "weapons and poisons",
                   "2-45": "instructions for crimes"}
    assert read_explanations(BUNDLE / "batch-0.jsonl.gz", ["1-1"], TEMPLATE) == {"1-1": "refusing harmful requests"}
    # without a Neuronpedia id every row counts, by the layer its source id starts with
    assert read_explanations(BUNDLE, ["1-104"]) == {"1-104": "another model's latent"}


def test_a_missing_or_broken_bundle_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_explanations(tmp_path / "nope", ["1-1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .jsonl.gz"):
        read_explanations(tmp_path / "empty", ["1-1"])
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        read_explanations(tmp_path / "bad.jsonl.gz", ["1-1"])
    with gzip.open(tmp_path / "cut.jsonl.gz", "wt") as f:
        f.write('{"modelId": "tiny", "layer": "1-res-tiny", "index": "1"\n')
    with pytest.raises(UserError, match="line 1 is not JSON"):
        read_explanations(tmp_path / "cut.jsonl.gz", ["1-1"])


def test_semantics_and_dashboards_take_explanations_from_the_bundle(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["saes"]["neuronpedia_id"] = TEMPLATE
    cfg["analyses"].update(neuronpedia_bundle=str(BUNDLE), neuronpedia_url="http://127.0.0.1:9",
                           neuronpedia_cache=str(tmp_path / "np-cache"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["analyze", "semantics", "dashboards", "-c", str(tmp_path / "cfg.yaml"),
                                   "-r", str(run), "-q"])
    assert res.exit_code == 0, res.output
    r = RunResults(run)
    expl = r.explanations()
    assert expl["1-1"] == "refusing harmful requests" and expl["1-2"] == "weapons and poisons"
    assert "another model" not in expl.get("1-104", "") and "wider SAE" not in expl.get("1-104", "")
    assert r.explanation_source() == "neuronpedia"
    dash = r.dashboards()
    assert dash["1-1"].explanation == "refusing harmful requests"
    before = RunResults(tiny_run)
    assert r.stage2_sets() == before.stage2_sets()  # only the stages that read the bundle reran
    assert r.stages()["stage2"]["config_hash"] == before.stages()["stage2"]["config_hash"]
    assert r.stages()["semantics"]["config_hash"] != before.stages()["semantics"]["config_hash"]


def test_the_bundle_reruns_its_readers_when_its_content_changes_not_its_place(tiny_run, tmp_path):
    """The semantics and dashboards hashes follow the bundle files' sha256: the same files moved to
    another folder rerun nothing; one description edited reruns both, and the new text is shown."""
    run, here = tmp_path / "run", tmp_path / "a" / "explanations"
    shutil.copytree(tiny_run, run)
    shutil.copytree(BUNDLE, here)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["saes"]["neuronpedia_id"] = TEMPLATE
    cfg["analyses"].update(neuronpedia_url="http://127.0.0.1:9", neuronpedia_cache=str(tmp_path / "np-cache"))

    def analyze(bundle: Path) -> dict[str, float]:
        cfg["analyses"]["neuronpedia_bundle"] = str(bundle)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        res = CliRunner().invoke(app, ["analyze", "semantics", "dashboards", "-c", str(tmp_path / "cfg.yaml"),
                                       "-r", str(run), "-q"])
        assert res.exit_code == 0, res.output
        return {s: e["started"] for s, e in RunResults(run).stages().items()}

    first = analyze(here)
    moved = tmp_path / "b" / "np-export"
    shutil.move(str(tmp_path / "a"), str(moved))
    assert analyze(moved / "explanations") == first  # same bytes elsewhere: nothing reran

    rows = gzip.open(moved / "explanations" / "batch-0.jsonl.gz", "rt", encoding="utf-8").read()
    with gzip.open(moved / "explanations" / "batch-0.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(rows.replace("refusing harmful requests", "declining dangerous asks"))
    edited = analyze(moved / "explanations")
    assert {s for s in edited if edited[s] != first[s]} == {"semantics", "dashboards"}
    r = RunResults(run)
    assert r.explanations()["1-1"] == "declining dangerous asks"
    assert r.dashboards()["1-1"].explanation == "declining dangerous asks"
