"""The Ray backend against the local one: the same config, run through the CLI on a local Ray
cluster of 2 CPUs (two model replicas), writes the same results as the in-process backend."""

import json

import pytest
import yaml
from test_pipeline_tiny import world  # noqa: F401  (module fixture: tiny Llama + SAEs on disk)
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.run.backend import shards

ray = pytest.importorskip("ray")

ARTIFACTS = ("stage1/results.jsonl", "stage2/sets.jsonl", "stage3/results.jsonl", "hydra/inactive_critical.json",
             "stage3_only/stage3_only.json", "controls/random_control.json", "controls/obrien.json")


def _load(path):
    text = path.read_text()
    return [json.loads(l) for l in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)


def _strip(summary: dict) -> dict:
    """Stage summaries without wall times and the run folder."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in ("seconds", "run")}
        return [clean(x) for x in v] if isinstance(v, list) else v
    return clean(summary)


def test_shards_cut_in_prompt_order():
    assert shards(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert shards([], 3) == []


def test_ray_backend_matches_local(world, tmp_path):  # noqa: F811
    cfg = yaml.safe_load((world / "cfg.yaml").read_text())
    cfg["execution"] = {"shard_size": 2}  # 6 refused prompts → 3 shards per fanned-out stage
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    base = ["run", "-c", str(tmp_path / "cfg.yaml"), "--json", "-q"]
    local = runner.invoke(app, base + ["-r", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, base + ["-r", str(tmp_path / "ray"), "--backend", "ray", "--workers", "2"])
    assert remote.exit_code == 0, remote.output
    assert not ray.is_initialized()  # the backend shuts down the cluster it started
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert _strip(a) == _strip(b)
    assert b["stage1"]["prompts"] == 6 and b["stage2"]["refused"] == 6
    for rel in ARTIFACTS:
        assert _load(tmp_path / "local" / rel) == _load(tmp_path / "ray" / rel), rel
    for run, backend, workers in (("local", "local", 1), ("ray", "ray", 2)):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["stages"]["stage2"]["executed"]["stage2"] == \
            {"backend": backend, "workers": workers, "items": 6, "shards": 3}
        assert manifest["stages"]["controls"]["executed"]["obrien"]["backend"] == backend
    written = yaml.safe_load((tmp_path / "ray" / "config.yaml").read_text())
    assert written["execution"]["backend"] == "ray" and written["execution"]["workers"] == 2


def test_backend_flags_are_checked(world, tmp_path):  # noqa: F811
    runner = CliRunner()
    res = runner.invoke(app, ["stage1", "-c", str(world / "cfg.yaml"), "-r", str(tmp_path / "r"), "--backend", "dask"])
    assert res.exit_code == 2 and "unknown backend 'dask'" in res.output
    res = runner.invoke(app, ["stage1", "-c", str(world / "cfg.yaml"), "-r", str(tmp_path / "r"),
                              "--backend", "local", "--address", "auto"])
    assert res.exit_code == 2 and "--address is for --backend ray" in res.output
