"""`demo-world info` reports the demo model on the bundled over-refusal set, measured on demand
and cached in the world folder: first on a world folder holding a tiny random Llama (offline,
fast), then on the real demo world when it is built (integration)."""

import json

import pytest
from tiny import tiny_llama
from typer.testing import CliRunner

from refusalscope.artifacts import atomic_write_json
from refusalscope.demo.world import is_built, model_dir, world_dir
from refusalscope.interfaces.cli import app
from refusalscope.io.prompts import load_bundled

runner = CliRunner()


def _check(out: dict) -> None:
    ps = load_bundled("overrefusal")
    rows = {r["set"]: r for r in out["rows"]}
    assert rows["safe (over-refusal)"]["n"] == sum(p.label == "harmless" for p in ps)
    assert rows["unsafe contrasts"]["n"] == sum(p.label == "harmful" for p in ps)
    assert len(out["by_kind"]) == len({p.category for p in ps})
    assert sum(r["n"] for r in out["by_kind"]) == rows["safe (over-refusal)"]["n"]


def test_info_measures_overrefusal_once_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path))
    hf, tok = tiny_llama()
    hf.save_pretrained(model_dir() / "model")
    tok.save_pretrained(model_dir() / "model")
    atomic_write_json(world_dir() / "world.json", {"status": "complete", "hash": "x", "path": str(world_dir()),
                                                   "timings": {}})
    res = runner.invoke(app, ["demo-world", "info", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["overrefusal"]
    _check(out)
    cached = json.loads((world_dir() / "overrefusal.json").read_text())
    ex = [e for e in cached["examples"] if e["label"] == "harmless"]
    assert out["rows"][0]["refused"] == round(sum(e["refused"] for e in ex) / len(ex), 4)
    # a second call reads the cache (a marked row shows it was not measured again)
    cached["rows"][0]["refused"] = 0.123
    (world_dir() / "overrefusal.json").write_text(json.dumps(cached))
    again = json.loads(runner.invoke(app, ["demo-world", "info", "--json"]).stdout)["overrefusal"]
    assert again["rows"][0]["refused"] == 0.123
    table = runner.invoke(app, ["demo-world", "info"])
    assert table.exit_code == 0 and "over-refusal set" in table.output
    assert "overrefusal" not in json.loads(runner.invoke(app, ["demo-world", "info", "--json",
                                                               "--no-overrefusal"]).stdout)


@pytest.mark.integration
def test_demo_world_info_reports_overrefusal():
    if not is_built():
        pytest.skip("the demo world is not built")
    res = runner.invoke(app, ["demo-world", "info", "--json"])
    assert res.exit_code == 0, res.output
    _check(json.loads(res.stdout)["overrefusal"])
