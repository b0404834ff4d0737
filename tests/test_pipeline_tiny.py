"""The whole pipeline (filter → direction → Stage 1 → Stage 2) through the CLI on a tiny
random-weight Llama saved to disk with SAELens-format SAEs: artifacts, Table 1, and resume."""

import json

import pandas as pd
import pytest
import yaml
from planted import CATEGORIES, planted_world
from tiny_world import write_tiny_world
from typer.testing import CliRunner

from refusalscope.errors import UserError
from refusalscope.interfaces.cli import app
from refusalscope.run.results import RunResults
from refusalscope.run.store import read_json


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("world"))


def test_pipeline_runs_and_resumes(world, capsys):
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
    # planted: the mechanism is the direction, so ablating it jailbreaks every refused prompt
    assert len(ablated) == 6 and all(r["jailbroken"] for r in ablated) and d["asr_after_ablation"] == 1.0
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
    # planted: the latents along r̂ (index < 3) fire on every harmful prompt, and harmful.jsonl holds two
    # prompts of each of four categories, so each found planted latent counts 2 in each and "4 types"
    acts = json.loads((run_dir / "taxonomy" / "category_activity.json").read_text())
    planted = [f for f in acts if int(f.split("-")[1]) < 3]
    assert planted and all(acts[f] == {c: 2 for c in CATEGORIES} for f in planted)
    assert out["taxonomy"]["histogram"]["by_count"]["4"] >= len(planted)
    assert out["taxonomy"]["n_features"] == len(acts) == len(RunResults(run_dir).critical_features())
    assert out["semantics"]["source"] == "activations" and out["semantics"]["n_features"] > 0
    manifest = read_json(run_dir / "manifest.json")
    stages = ("filter", "direction", "stage1", "stage2", "stage3", "hydra", "stage3_only", "controls",
              "ce_loss", "taxonomy", "clamping", "semantics")
    assert [manifest["stages"][s]["status"] for s in stages] == ["done"] * len(stages)
    for f in ("direction/direction.safetensors", "direction/cosine.png", "stage1/results.jsonl",
              "stage1/k_distribution.png", "stage2/sets.jsonl", "stage2/table1.json",
              "stage3/fm.safetensors", "stage3/rankings.parquet", "controls/obrien.png",
              "taxonomy/categories.png", "taxonomy/study_items.json", "semantics/explanations.json"):
        assert (run_dir / f).exists(), f
    results = RunResults(run_dir)
    sets = results.stage2()
    for rec in sets.values():  # every chosen set is the smallest jailbreaking one over the τ sweep
        wins = [t.size for t in rec.per_tau if t.jailbroken]
        assert (rec.set is None) == (not wins) and (not wins or len(rec.set) == min(wins))
        if rec.set is not None:  # its active/inactive split covers it exactly
            assert sorted(rec.active | rec.inactive) == sorted(rec.set)
    chosen = {pid: r for pid, r in sets.items() if r.set is not None}
    # inactive = silent at every token of the plain prompt, recounted with the full SAE encode
    model, saes = planted_world()  # the world write_tiny_world saved
    text = {p.id: p.text for p in results.kept_prompts()}
    silent = 0
    for pid, r in chosen.items():
        batch = model.encode([text[pid]])
        res = model.residuals(batch, sorted({f.layer for f in r.set}))
        silent += sum(float(saes[f.layer].encode(res[f.layer])[0, :, f.index].max()) <= 0 for f in r.set)
    assert s2["inactive_share"] == round(silent / sum(len(r.set) for r in chosen.values()), 4)
    assert set(results.stage1()) == {p.id for p in results.kept_prompts()}
    assert {pid for pid, r in results.stage3().items() if r.k} == set(results.stage3_sets())
    # Stage 1 searched SAE layers up to l* only (stage1.layers: to_lstar), minus the excluded one
    assert s1["layers"] == [l for l in range(1, 4) if l <= d["layer"]]
    # per-prompt Stage 3 rankings: each prompt's own Stage 2 latents are never in its ranking,
    # and its Stage 3 set is the head of its ranking
    rankings, s2_sets = results.stage3_rankings(), results.stage2_sets()
    assert set(rankings) == {p.id for p in results.kept_prompts()}
    assert s3["ranking"]["own"] + s3["ranking"]["global"] == len(rankings) and s3["ranking"]["own"] >= 1
    for pid, ranked in rankings.items():
        feats = [f for f, _ in ranked]
        assert not set(feats) & set(s2_sets.get(pid, ()))
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    for pid, s in results.stage3_sets().items():
        assert list(s) == [f for f, _ in rankings[pid][: results.stage3()[pid].k]]
    with pytest.raises(UserError, match="per prompt"):
        results.stage3_ranking()
    # the CLI prints every stage's table (both taxonomy views, Table 4) without failing
    from refusalscope.interfaces.tables import print_stage_summaries

    capsys.readouterr()
    print_stage_summaries(out)
    shown = capsys.readouterr().out
    for part in ("Refusal filter", "Table 2", "Fig 3", "Table 4"):
        assert part in shown, part
    assert set(out["taxonomy"]["histograms"]) == {"every_token", "sinks_skipped"}
    assert out["semantics"]["n_by_stage"]["stage1"] == len(results.stage1_features()) > 0
    # the studies read a finished run: FM accuracy per input choice, and the comparison tables
    fm_rows = _bench("study_fm_inputs").study(str(run_dir), sizes=(2,))
    assert [(r["rows"], r["scale"]) for r in fm_rows] == [("tokens", "max_abs"), ("tokens", "none"),
                                                          ("pooled", "max_abs"), ("pooled", "none")]
    assert fm_rows[0]["n_train_rows"] == 4 * fm_rows[2]["n_train_rows"]  # four token rows per prompt
    nums = _bench("compare_runs").numbers(str(run_dir))
    assert nums["stage3"]["jailbroken"] == f"{s3['table2']['jailbroken']} / 6"
    assert "| stage2 | run |" in _bench("compare_runs").table([nums], "stage2")
    # the direction's harmful train prompts are the refused ones (six of the eight)
    assert (d["n_train_harmful"], d["n_train_harmful_given"]) == (6, 8)
    # every verdict says which judge decided it
    filt = [json.loads(l) for l in (run_dir / "filter" / "completions.jsonl").read_text().splitlines()]
    assert {r["decided_by"] for r in filt} == {"first-token"} and out["filter"]["decided_by"] == {"first-token": 8}

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


def test_stage2_can_prune_the_pool_of_prompts_stage1_left_refused(world, tmp_path):
    """stage2.unbroken: k_max (the Llama preset: one Stage 1 rung): Algorithm 1 also runs on
    prompts no Stage 1 rung jailbroke, with the k_max pool; nothing before Stage 1 reruns."""
    import shutil

    runner = CliRunner()
    base = world / "run"
    if not (base / "manifest.json").exists():
        assert runner.invoke(app, ["stage2", "-c", str(world / "cfg.yaml"), "-r", str(base), "-q"]).exit_code == 0
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    cfg = yaml.safe_load((world / "cfg.yaml").read_text())
    cfg["stage2"]["unbroken"] = "k_max"
    cfg["stage1"].update(k_start=1, k_max=1)  # one rung, as the Llama preset has
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["stage2", "-c", str(tmp_path / "cfg.yaml"), "-r", str(run_dir), "--json", "-q"])
    assert res.exit_code == 0, res.output
    s2 = json.loads(res.stdout)["stage2"]
    s1 = RunResults(run_dir).summary("stage1")
    assert s2["stage1_jailbroken"] == s1["jailbroken"] < s2["stage2_prompts"] == s2["refused"] == 6
    records = RunResults(run_dir).stage2()
    unbroken = {pid for pid, r in RunResults(run_dir).stage1().items() if r.k is None}
    assert unbroken and unbroken <= set(records)
    assert all(records[pid].candidates == len(s1["layers"]) for pid in unbroken)  # k_max = 1 per layer
    assert RunResults(run_dir).summary("direction") == RunResults(base).summary("direction")


def _bench(name: str):
    from bench_scripts import load_benchmark

    return load_benchmark(name)


def test_config_errors_are_one_line(world, tmp_path):
    bad = yaml.safe_load((world / "cfg.yaml").read_text())
    bad["saes"]["layers"] = [0, 9]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    res = CliRunner().invoke(app, ["stage1", "-c", str(tmp_path / "bad.yaml"), "-r", str(tmp_path / "r")])
    assert res.exit_code == 2
    lines = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "saes.layers" in lines[0]
