"""The documentation site builds strictly (a broken link, anchor or docstring warning fails it),
its generated references carry every config key and CLI command, a page that mkdocs.yml does not
list still lands in the nav, and the README's links point at files that exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_the_front_door_and_its_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 150
    # the two commands come first, exactly
    code = [line for line in lines[:8] if line.startswith("make ")]
    assert [c.split()[:2] for c in code] == [["make", "demo"], ["make", "test"]]
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_unlisted_entries_names_only_the_pages_the_nav_lacks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "_tools" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    nav = [{"Home": "index.md"}, {"Ref": [{"Config": "reference/config.md"}, "errors.md"]}]
    pages = [("index.md", "# Home"), ("errors.md", "# Errors"), ("export.md", "# Exporting a run\n\ntext"),
             ("apply.md", "no heading here"), ("reference/config.md", "# Configuration")]
    entries = hooks.unlisted_entries(nav, pages)
    assert entries == [{"Apply": "apply.md"}, {"Exporting a run": "export.md"}]
    # a page placed in an existing section goes there; one placed in a missing section, or not
    # placed, goes under "More"
    hooks.place_entries(nav, entries + [{"Width": "width.md"}], {"export.md": "Ref", "width.md": "Nowhere"})
    assert nav[1] == {"Ref": [{"Config": "reference/config.md"}, "errors.md", {"Exporting a run": "export.md"}]}
    assert nav[2] == {"More": [{"Apply": "apply.md"}, {"Width": "width.md"}]} and len(nav) == 3


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (the `docs` extra: pip install -e '.[docs]')")
def test_site_builds_strictly_with_generated_references_and_unlisted_pages(tmp_path):
    from refusalscope.run.config import Config

    # a copy of the docs with one page mkdocs.yml does not list, as another branch would add it
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "src").symlink_to(ROOT / "src")
    (tmp_path / "docs" / "zz-new-feature.md").write_text("# A page nobody listed\n\nSee [the method](method.md).\n")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir",
                           str(site)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config_page = (site / "reference" / "config.html").read_text(encoding="utf-8")
    default = Config()
    keys = [f"{section}.{name}" if hasattr(type(getattr(default, section)), "model_fields") else section
            for section in Config.model_fields
            for name in getattr(type(getattr(default, section)), "model_fields", [section])]
    assert len(keys) > 100
    absent = [k for k in keys if f"<code>{k}</code>" not in config_page]
    assert not absent, f"config keys missing from the generated reference: {absent}"

    cli_page = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    for command in ("refusalscope demo", "refusalscope run", "refusalscope eval", "refusalscope serve",
                    "refusalscope demo-world build", "refusalscope config show", "--no-deps", "--accept-version"):
        assert command in cli_page, command

    api_page = (site / "reference" / "api.html").read_text(encoding="utf-8")
    import refusalscope

    undocumented = [name for name in refusalscope._API
                    if not re.search(rf'id="refusalscope\.[\w.]*\b{name}"', api_page)]
    assert not undocumented, f"public names without an entry on the API page: {undocumented}"

    artifacts = (site / "artifacts.html").read_text(encoding="utf-8")
    assert "generated: stage inputs" not in artifacts and "<code>analyses.wake_threshold</code>" in artifacts

    index = (site / "index.html").read_text(encoding="utf-8")
    assert "A page nobody listed" in index and "zz-new-feature.html" in index
