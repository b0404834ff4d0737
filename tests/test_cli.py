"""The CLI: help, presets, and one-line errors (typer's runner, real files)."""

from typer.testing import CliRunner

from refusalscope.interfaces.cli import app

runner = CliRunner()


def test_help_lists_commands():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("demo", "demo-world", "config", "filter"):
        assert cmd in out


def test_config_show_and_validate(tmp_path):
    res = runner.invoke(app, ["config", "show", "llama-3.1-8b-it"])
    assert res.exit_code == 0 and "llama_scope_lxr_8x" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("judge:\n  nmae: substring\n")
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "unknown key 'judge.nmae'" in lines[0]


def test_demo_world_path_honours_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path))
    res = runner.invoke(app, ["demo-world", "path"])
    assert res.exit_code == 0 and res.output.strip().startswith(str(tmp_path))
    res = runner.invoke(app, ["demo-world", "info"])
    assert res.exit_code == 2 and "not built" in res.output


def test_a_command_without_a_config_reuses_the_run_directorys_own(tiny_run, tmp_path):
    """`refusalscope analyze hydra -r RUN` (no -c) means the run's config, not the demo preset:
    nothing reruns and the log says which config it read."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "manifest.json").read_text())["stages"]
    res = CliRunner().invoke(app, ["analyze", "hydra", "-r", str(run)])
    assert res.exit_code == 0, res.output
    assert f"config: {run / 'config.yaml'} (the run's own" in res.output and "nothing to run" in res.output
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert {s: e["started"] for s, e in after.items()} == {s: e["started"] for s, e in before.items()}
