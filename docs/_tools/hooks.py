"""MkDocs hooks of the refusalscope site (named under `hooks:` in mkdocs.yml).

- The configuration and CLI references are generated from the code at build time
  (`reference.py`), so they cannot drift from the schema or the typer app.
- A marker in a hand-written page (`<!-- generated: stage inputs -->`) becomes the table of what
  each stage reads, from `run/inputs.py`.
- Any docs/*.md page that mkdocs.yml's nav does not list (a page another branch added, such as an
  exporter's or a new feature's) is appended to the nav, so it shows without editing mkdocs.yml
  and the strict build stays green: under the top-level section `extra.place` names for it
  (pages expected from other branches; a missing one is simply skipped), else under "More".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

GENERATED = {"reference/config.md": "config_markdown", "reference/cli.md": "cli_markdown"}
# a marker in a hand-written page, replaced by a generated table
MARKERS = {"<!-- generated: stage inputs -->": "stage_inputs_markdown"}
MORE = "More"


def _reference_module():
    spec = importlib.util.spec_from_file_location("_rs_docs_reference", Path(__file__).with_name("reference.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def listed(nav: Any) -> set[str]:
    """Every page path a nav (as written in mkdocs.yml) names."""
    out: set[str] = set()
    if isinstance(nav, str):
        out.add(nav)
    elif isinstance(nav, dict):
        for v in nav.values():
            out |= listed(v)
    elif isinstance(nav, list):
        for item in nav:
            out |= listed(item)
    return out


def _title(path: str, text: str) -> str:
    """The page's first '# ' heading, else its file name."""
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return Path(path).stem.replace("-", " ").replace("_", " ").capitalize()


def unlisted_entries(nav: Any, pages: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Nav entries for the (path, markdown) pages that `nav` does not name, sorted by path."""
    named = listed(nav)
    return [{_title(p, text): p} for p, text in sorted(pages) if p not in named]


def place_entries(nav: list, entries: list[dict[str, str]], place: dict[str, str]) -> None:
    """Append each entry to the top-level section `place` names for its page, else to "More"."""
    sections = {k: v for item in nav if isinstance(item, dict) for k, v in item.items() if isinstance(v, list)}
    for entry in entries:
        path = next(iter(entry.values()))
        title = place.get(path, MORE)
        if title not in sections:
            if title != MORE:
                title = MORE
            if MORE not in sections:
                sections[MORE] = []
                nav.append({MORE: sections[MORE]})
        sections[title].append(entry)


def on_files(files: Files, config: Any) -> Files:
    ref = _reference_module()
    for path, fn in GENERATED.items():
        if files.get_file_from_path(path) is None:
            files.append(File.generated(config, path, content=getattr(ref, fn)()))
    nav = config.get("nav")
    if nav:
        pages = [(f.src_uri, f.content_string) for f in files.documentation_pages()]
        place = (config.get("extra") or {}).get("place") or {}
        place_entries(nav, unlisted_entries(nav, pages), place)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    for marker, fn in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, getattr(_reference_module(), fn)())
    return markdown
