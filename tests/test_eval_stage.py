"""`refusalscope eval` on the planted tiny world through the CLI: the held-out split, every
intervention row on held-out / search / harmless / a labelled benchmark file / general text,
cells that agree with the per-prompt rows and with an independent recomputation, resume and
reuse of cached rows."""

import json

import pytest
import yaml
from planted import HARMFUL, HARMLESS, save_planted_world
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.interventions.features import FeatureSet
from refusalscope.interventions.spec import DirectionAblation
from refusalscope.methods.evaluate import generate_judged
from refusalscope.run.results import RunResults
from refusalscope.run.runner import open_context
from refusalscope.run.store import read_json, read_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalworld")
    threshold = save_planted_world(root)
    # a labelled benchmark in XSTest's layout: prompt, label safe/unsafe, type
    (root / "bench.csv").write_text("prompt,label,type\n" + "".join(
        f"{t},{lab},{kind}\n" for t, lab, kind in
        [(HARMFUL[0], "unsafe", "contrast"), (HARMFUL[3], "unsafe", "contrast"), (HARMLESS[0], "safe", "homonym"),
         (HARMLESS[2], "safe", "homonym"), (HARMLESS[5], "safe", "figurative")]))
    data = {
        k: str(root / f"{'harmful' if 'harmful' in k else 'harmless'}.txt")
        for k in ("harmful_train", "harmful_val", "harmful_test", "harmless_train", "harmless_val", "harmless_test")
    }
    cfg = {"name": "tiny", "seed": 0,
           "model": {"source": str(root / "model"), "dtype": "float32", "device": "cpu", "batch_size": 8},
           "saes": {"source": "local", "path": str(root / "saes" / "layer_{layer}"), "layers": "all"},
           "data": {**data, "harmful_test": str(root / "harmful.jsonl"), "heldout_fraction": 0.34},
           "judge": {"name": "first-token", "options": {"threshold": threshold}, "degenerate_is_jailbreak": True},
           "generation": {"max_new_tokens": 3, "batch_size": 4},
           "direction": {"n_val": 8, "max_kl": 100.0, "n_generate": 2, "random_controls": 0},
           "stage1": {"exclude_layers": [0], "k_start": 1, "k_step": 1, "k_max": 6},
           "stage2": {"block_size": 2, "taus": [0.05, 0.2, 0.5], "seeds": [0, 1]},
           "stage3": {"harmful": [str(root / "harmful.jsonl")], "harmless": [str(root / "harmless.txt")],
                      "layers": [1, 2, 3], "ks": [1, 2, 4], "probe_ks": [1], "epochs": 2, "embedding_size": 4,
                      "collapse_sizes": [], "batch_size": 4},
           "eval": {"core_sizes": [1, 2, 500], "category_core_size": 1, "category_min_sets": 1,
                    "random_seeds": [0, 1], "clamp_values": [4.0], "ce_texts": 4,
                    "general_text": str(root / "harmless.txt"),
                    "datasets": ["heldout", "search", "harmless", str(root / "bench.csv"), "general"]}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _eval(world, run_dir, *extra):
    res = runner.invoke(app, ["eval", "-c", str(world / "cfg.yaml"), "-r", str(run_dir), "--json", "-q", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["eval"]


def test_eval_matrix_end_to_end(world):
    run_dir = world / "run"
    summary = _eval(world, run_dir)
    r = RunResults(run_dir)
    # the held-out split: per category, disjoint from the search split, together the refused prompts
    search, held = r.search_prompts(), r.heldout_prompts()
    filt = r.summary("filter")
    assert filt["n_search"] == len(search) and filt["n_heldout"] == len(held) and len(held) >= 2
    assert len(search) + len(held) == filt["n_kept"]
    assert not {p.id for p in search} & {p.id for p in held}
    assert set(r.stage1()) == {p.id for p in search}  # Stages 1-3 never saw the held-out prompts

    rows = {x["name"]: x for x in r.eval_interventions()}
    stage2 = r.stage2_sets()
    assert stage2, "the planted world jailbreaks at least one search prompt"
    union = FeatureSet(f for s in stage2.values() for f in s)
    assert {"none", "direction", "actadd", "core@1", "core@2", "core@500", "stage2_union", "critical_union"} <= set(
        rows
    )
    assert rows["core@500"]["size"] == len(union) and rows["core@500"]["same_as"] in (None, "core@2", "core@1")
    assert rows["stage2_union"]["same_as"] is not None  # identical latents to a core row: not run twice
    counts = {}
    for s in stage2.values():
        for f in s:
            counts[f.id] = counts.get(f.id, 0) + 1
    assert counts[rows["core@1"]["features"][0]] == max(counts.values())  # the most often critical latent
    for row in rows.values():
        if row["kind"] == "random":
            core = rows[row["matched"]]
            assert row["layers"] == core["layers"] or row["short"]  # same layer mix
            assert not set(row["features"]) & set(union.ids())  # no critical latent in the control
    assert any(r["kind"] == "core_category" for r in rows.values())

    table = r.eval_table()
    cells = {(c.intervention, c.dataset, c.part): c for c in table.itertuples()}
    parts = {(d, p) for _, d, p in cells}
    assert {("heldout", "harmful"), ("search", "harmful"), ("harmless", "harmless"), ("bench", "harmful"),
            ("bench", "harmless"), ("general", "text")} == parts
    assert cells[("none", "bench", "harmful")].n == 2 and cells[("none", "bench", "harmless")].n == 3
    assert cells[("none", "harmless", "harmless")].kl == 0 and cells[("none", "general", "text")].ce_delta == 0
    assert cells[("direction", "harmless", "harmless")].kl > 0
    # every prompt cell is the mean of its per-prompt rows; aliased rows carry their target's rows
    comp = r.eval_completions()
    for (iv, ds, part), c in cells.items():
        if part == "text":
            continue
        mine = [x for x in comp if x["intervention"] == iv and x["dataset"] == ds and (x["label"] or "all") == part]
        assert len(mine) == c.n and sum(x["refused"] for x in mine) / c.n == pytest.approx(c.refusal_rate)
        assert all(x["judge"] == "first-token" for x in mine)
    alias = rows["stage2_union"]["same_as"]
    assert (
        cells[("stage2_union", "heldout", "harmful")].refusal_rate == cells[(alias, "heldout", "harmful")].refusal_rate
    )

    # an independent recomputation of one cell: the refusal direction on the held-out prompts
    ctx = open_context(str(world / "cfg.yaml"), run_dir, quiet=True)
    direction, _ = r.direction()
    try:
        j = generate_judged(ctx.model, None, [p.text for p in held], None, ctx.judge, 3, 4,
                            shared=[DirectionAblation(direction)])
    finally:
        ctx.close()  # the run directory's lock: the next test writes to it
    assert sum(j.jailbroken) / len(held) == pytest.approx(cells[("direction", "heldout", "harmful")].jailbreak_rate)

    assert {"heatmap", "tradeoff", "core_curve"} == set(r.eval_figures())
    assert summary["rows"][0]["intervention"] == "none" and "heldout harmful jailbroken" in summary["rows"][0]
    assert "bos_clamp" in " ".join(r.eval_notes())  # hydra has not run: said, not silently dropped


def test_eval_resumes_and_reuses_cached_rows(world, tmp_path):
    run_dir = world / "run"
    if not (run_dir / "eval" / "cells.parquet").exists():
        _eval(world, run_dir)
    before = RunResults(run_dir).eval_table()
    cache = next((run_dir / "eval").glob("cache-*.jsonl"))
    lines = cache.read_text().splitlines()
    # killed mid-way: half the cached items are gone and the stage is not done
    cache.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    manifest = read_json(run_dir / "manifest.json")
    manifest["stages"]["eval"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    _eval(world, run_dir)
    after = RunResults(run_dir).eval_table()
    assert after.drop(columns=["judges"]).equals(before.drop(columns=["judges"]))
    assert len(read_jsonl(cache)) == len(lines)  # each item computed once
    # a narrower selection is a new stage hash but reuses every cached row
    record = (run_dir / "config.yaml").read_bytes()
    small = _eval(world, run_dir, "--datasets", "heldout,general", "--interventions", "none,direction")
    assert [x["intervention"] for x in small["rows"]] == ["none", "direction"]
    # the run's record of how it was made is untouched; eval records its own choice in eval/
    assert (run_dir / "config.yaml").read_bytes() == record
    assert yaml.safe_load(record)["eval"]["datasets"][:3] == ["heldout", "search", "harmless"]
    assert read_json(run_dir / "eval" / "interventions.json")["asked"] == {
        "datasets": ["heldout", "general"], "interventions": ["none", "direction"]}
    assert len(read_jsonl(cache)) == len(lines)
    t = RunResults(run_dir).eval_table()
    assert set(t["dataset"]) == {"heldout", "general"}


def test_eval_errors_are_one_line(world):
    res = runner.invoke(app, ["eval", "-c", str(world / "cfg.yaml"), "-r", str(world / "run"),
                              "--interventions", "none,bogus"])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "eval.interventions" in lines[0]
