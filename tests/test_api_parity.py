"""The Python API gives the numbers `refusalscope run` gives: Stages 1-3 through `rs.stage1/2/3`
with the run's config, on the run's own refused prompts and direction, reproduce the tiny world
run's candidate sets, minimal sets, Stage 3 rankings, K ladders and tables exactly."""

import pytest

import refusalscope as rs


@pytest.fixture(scope="module")
def api_world(tiny_reference):
    run_dir, _ = tiny_reference
    res = rs.open_run(run_dir)
    cfg = res.config()
    model = rs.load_model(cfg.model.source, dtype="float32", device="cpu")
    saes = rs.load_saes(cfg.saes.path, model=model)
    return res, cfg, model, saes


def test_api_stages_equal_the_pipeline(api_world):
    res, cfg, model, saes = api_world
    kept = res.kept_prompts()
    direction, lstar = res.direction()

    records, cands = rs.stage1(model, saes, kept, direction, lstar=lstar, config=cfg)
    run1 = res.stage1()
    assert [r.to_json() for r in records] == [run1[p.id].to_json() for p in kept]  # K, rungs, replies, verdicts
    assert cands == res.stage1_sets() and cands  # same L_K, same order

    sets = rs.stage2(model, saes, kept, cands, config=cfg)
    run2 = res.stage2()
    assert [r.to_json() for r in sets] == [r.to_json() for r in run2.values()]
    assert {r.id: r.set for r in sets if r.set is not None} == res.stage2_sets() != {}

    inter = rs.stage3(model, saes, kept, sets, harmful=cfg.stage3.harmful[0], harmless=cfg.stage3.harmless[0],
                      lstar=lstar, config=cfg)
    run3 = res.stage3()
    assert [r.to_json() for r in inter.records] == [run3[p.id].to_json() for p in kept]
    assert inter.rankings == res.stage3_rankings()  # per-prompt ranking, per-token FM rows
    summary = res.summary("stage3")
    for key in ("fm", "probe", "ranking", "table2", "probe_vs_fm", "layers"):
        assert inter.summary[key] == summary[key], key


def test_api_config_defaults_are_the_clis(api_world):
    """Without a config the API runs the demo preset's defaults, as the CLI does without -c:
    Stage 1 searches SAE layers up to l* minus the excluded first layers, not every layer."""
    from refusalscope.run.config import load_config

    res, cfg, model, saes = api_world
    kept = res.kept_prompts()[:2]
    direction, _ = res.direction()
    demo = load_config(None)
    assert demo.stage1.exclude_layers == [0, 1]
    with pytest.raises(rs.UserError, match="no Stage 1 layers left"):  # l* = 1 leaves nothing above layer 1
        rs.stage1(model, saes, kept, direction, rs.make_judge("substring"), lstar=1)
    with pytest.raises(rs.UserError, match="pass lstar="):
        rs.stage1(model, saes, kept, direction, rs.make_judge("substring"))
    with pytest.raises(rs.UserError, match="not a ladder"):
        rs.stage1(model, saes, kept, direction, lstar=3, ks=[1, 2, 4], config=cfg)
