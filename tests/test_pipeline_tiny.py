"""The whole pipeline (filter → direction → Stage 1 → Stage 2) through the CLI on a tiny
random-weight Llama saved to disk with SAELens-format SAEs: artifacts, Table 1, and resume."""

import json

import pandas as pd
import pytest
import yaml
from tiny_world import write_tiny_world
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.run.results import RunResults
from refusalscope.run.store import read_json


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("world"))


def test_pipeline_runs_and_resumes(world):
    runner = CliRunner()
    run_dir = world / "run"
    res = runner.invoke(app, ["run", "-c", str(world / "cfg.yaml"), "-r", str(run_dir), "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["filter"]["n_in"] == 8 and out["filter"]["n_kept"] == 6
    d = out["direction"]
    cands = pd.read_parquet(run_dir / "direction" / "candidates.parquet")
    assert cands.loc[cands["selected"], "layer"].tolist() == [d["layer"]]
    ablated = [json.loads(l) for l in (run_dir / "direction" / "completions.jsonl").read_text().splitlines()]
    ablated = [r for r in ablated if r["set"] == "ablate"]
    assert d["asr_after_ablation"] == round(sum(r["jailbroken"] for r in ablated) / len(ablated), 4)
    s1, s2 = out["stage1"], out["stage2"]
    assert s1["prompts"] == 6 and s1["jailbroken"] >= 3
    assert s2["stage1_jailbroken"] == s1["jailbroken"] and s2["jailbroken"] <= s1["jailbroken"]
    assert s2["refused"] == 6 and s2["jailbroken"] >= 1
    assert s2["forward_passes"]["literal_sequential"] > s2["forward_passes"]["batched_sequential"]
    s3 = out["stage3"]
    assert s3["fm"]["columns"] > 0 and set(s3["fm"]["collapse"]) == {"4", "2"}
    assert s3["table2"]["refused"] == 6 and [r["k"] for r in s3["probe_vs_fm"]] == ["1", "4", "any"]
    assert out["hydra"]["inactive_critical"]["n_prompts"] == s2["jailbroken"]
    assert [r["seed"] for r in out["controls"]["random"]["per_seed"]] == [0, 1]
    assert {(r["dataset"], r["setting"]) for r in out["ce_loss"]["rows"]} == {
        (d, s) for d in ("instructions", "general") for s in ("baseline", "direction", "features")}
    assert sum(out["taxonomy"]["histogram"]["by_count"].values()) + out["taxonomy"]["histogram"]["none"] \
        == out["taxonomy"]["n_features"]
    assert out["semantics"]["source"] == "activations" and out["semantics"]["n_features"] > 0
    manifest = read_json(run_dir / "manifest.json")
    stages = ("filter", "direction", "stage1", "stage2", "stage3", "hydra", "stage3_only", "controls",
              "ce_loss", "taxonomy", "clamping", "semantics")
    assert [manifest["stages"][s]["status"] for s in stages] == ["done"] * len(stages)
    for f in ("direction/direction.safetensors", "direction/cosine.png", "stage1/results.jsonl",
              "stage1/k_distribution.png", "stage2/sets.jsonl", "stage2/table1.json",
              "stage3/fm.safetensors", "stage3/ranking.parquet", "controls/obrien.png",
              "taxonomy/categories.png", "taxonomy/study_items.json", "semantics/explanations.json"):
        assert (run_dir / f).exists(), f
    results = RunResults(run_dir)
    sets = results.stage2()
    for rec in sets.values():  # every chosen set is the smallest jailbreaking one over the τ sweep
        wins = [t.size for t in rec.per_tau if t.jailbroken]
        assert (rec.set is None) == (not wins) and (not wins or len(rec.set) == min(wins))
        if rec.set is not None:  # its active/inactive split covers it exactly
            assert sorted(rec.active | rec.inactive) == sorted(rec.set)
    chosen = [r for r in sets.values() if r.set is not None]
    n_inactive = sum(len(r.inactive) for r in chosen)
    assert s2["inactive_share"] == round(n_inactive / sum(len(r.set) for r in chosen), 4)
    assert set(results.stage1()) == {p.id for p in results.kept_prompts()}
    assert {pid for pid, r in results.stage3().items() if r.k} == set(results.stage3_sets())

    # a second run skips every stage and reports the same numbers
    again = runner.invoke(app, ["run", "-c", str(world / "cfg.yaml"), "-r", str(run_dir), "--json", "-q"])
    assert json.loads(again.stdout)["stage2"] == s2

    # an interrupted direction stage reuses its mean differences and scored candidates
    assert (run_dir / "direction" / "candidates.partial.jsonl").exists()
    manifest["stages"]["direction"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    redo = runner.invoke(app, ["direction", "-c", str(world / "cfg.yaml"), "-r", str(run_dir), "--json", "-q"])
    assert redo.exit_code == 0, redo.output
    assert json.loads(redo.stdout)["direction"]["layer"] == d["layer"]
    manifest = read_json(run_dir / "manifest.json")

    # a stage interrupted after some prompts resumes from its checkpoint
    results = (run_dir / "stage1" / "results.jsonl").read_text().splitlines()
    (run_dir / "stage1" / "results.partial.jsonl").write_text("\n".join(results[:3]) + "\n")
    manifest["stages"]["stage1"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    resumed = runner.invoke(app, ["stage1", "-c", str(world / "cfg.yaml"), "-r", str(run_dir), "--json", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["stage1"]["jailbroken"] == s1["jailbroken"]


def test_config_errors_are_one_line(world, tmp_path):
    bad = yaml.safe_load((world / "cfg.yaml").read_text())
    bad["saes"]["layers"] = [0, 9]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    res = CliRunner().invoke(app, ["stage1", "-c", str(tmp_path / "bad.yaml"), "-r", str(tmp_path / "r")])
    assert res.exit_code == 2
    lines = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "saes.layers" in lines[0]
