"""The wide planted world, CI-sized (`planted_world.py --wide --small`: a Gemma2ForCausalLM with 20
layers, Gemma Scope-format JumpReLU SAEs 32x its width on every layer): its planted latents flip
refused prompts, and the whole wide path runs on it through the CLI as B11 does (every stage and
analysis of the gemma-2-2b-it preset, dashboards, eval, report, web pages) and finds them."""


import pytest
import yaml
from bench_scripts import load_benchmark
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.interfaces.web.app import create_app
from refusalscope.run.config import ANALYSES, _merge
from refusalscope.run.results import RunResults

_bench = load_benchmark


@pytest.fixture(scope="module")
def wide_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide") / "world"
    info = _bench("planted_world").build_world(root, "gemma-2-2b", small=True, wide=True, n_stats=96,
                                               log=lambda *_: None)
    return root, info


def test_wide_world_has_the_issue_shape_and_its_planted_latents_flip_refusals(wide_world):
    root, info = wide_world
    assert (info["layers"], info["d_sae"], info["d_model"], info["format"]) == (20, 2048, 64, "gemma_scope")
    assert sorted(map(int, info["planted"])) == list(range(20))
    n_harmful = len((root / "prompts" / "harmful_test.jsonl").read_text().splitlines())
    assert n_harmful >= 100
    assert info["check"]["harmful_refused"] > 0.5 and info["check"]["flipped_of_refused"] > 0.5
    cfg = (root / "config.yaml").read_text()
    assert "width_2k/" in cfg and "gemma-2-2b-it" in cfg


@pytest.mark.integration
def test_the_wide_path_runs_through_the_cli_and_finds_the_planted_latents(wide_world, tmp_path):
    """B11's sequence, one CLI command per stage (in process: CI time), on the preset's own filters
    (exclude_layers [0, 1]): the world's refusal sits deep enough for Stage 1 to have layers."""
    root, info = wide_world
    wide = _bench("bench_wide_pipeline")
    run = tmp_path / "run"
    config, cfg = wide.prepare(root, run, 16, True)
    # CI time: eval is B11's slowest step here; fewer prompts, core sets and seeds (same code paths)
    cfg = _merge(cfg, {"eval": {"max_prompts": 6, "core_sizes": [5, 10], "random_seeds": [0]}})
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    runner = CliRunner()
    steps = [[s] for s in wide.CORE] + [["analyze"], ["eval"]]
    for args in steps:
        res = runner.invoke(app, [*args, "-c", str(config), "-r", str(run), "-q"])
        assert res.exit_code == 0, (args, res.output[-2000:])
    rr = RunResults(run)
    assert [s for s in (*wide.CORE, *ANALYSES, "dashboards", "eval") if not rr.done(s)] == []
    lstar = rr.direction()[1]
    assert lstar >= 2 and set(rr.stage1_ranked()) == set(range(2, lstar + 1))
    rec = _bench("planted_recovery").planted_recovery(run, root)
    assert rec["stage1"]["recall"] > 0.5 and rec["stage2"]["precision"] > 0.5, rec
    assert rec["stage3"]["recall_with_stage2"] > 0.5, rec
    planted = _bench("planted_recovery").planted_features(root)
    found = sorted(f for s in rr.stage2_sets().values() for f in s if f in planted)
    res = runner.invoke(app, ["report", str(run), "-q"])
    assert res.exit_code == 0, res.output[-2000:]
    html = (run / "report.html").read_text()
    assert all(f.id in html for f in found)
    pid = next(p for p, s in rr.stage2_sets().items() if any(f in planted for f in s))
    with TestClient(create_app(run)) as client:
        for page in ["/", "/latents", "/prompts", f"/prompts/{pid}", f"/latents/{found[0].id}"]:
            r = client.get(page)
            assert r.status_code == 200, page
            assert page != f"/latents/{found[0].id}" or found[0].id in r.text
