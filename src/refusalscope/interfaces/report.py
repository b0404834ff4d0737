"""`refusalscope report`: a run directory as one self-contained HTML file (CSS and images inlined,
no script, no external URL), so it opens from disk with no server and no network.

`build_report` is a pure function of the run directory; the templates are shared with the web
app and autoescape everything, since prompts and model replies are untrusted text."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from ..artifacts import atomic_write_text, check_writable
from ..run.results import RunResults
from .latent_views import RunIndex
from .tables import fmt
from .views import build_sections


def _columns(rows: Sequence[Mapping]) -> list[str]:
    """Column names over all rows, in first-seen order (rows may differ in keys)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def _fmt_cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return fmt(v)


def _tokshow(t: str) -> str:
    """A token as shown in a context: line breaks and tabs made visible."""
    return t.replace("\n", "↵").replace("\t", "⇥")


def environment() -> Environment:
    """The Jinja environment of the report and the web app (autoescape on for every template)."""
    env = Environment(loader=PackageLoader("refusalscope.interfaces", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt_cell, columns=_columns, tokshow=_tokshow, tokrepr=repr)
    return env


def stylesheet() -> str:
    return (resources.files("refusalscope.interfaces") / "static" / "app.css").read_text(encoding="utf-8")


MAX_CARDS = 300  # latent cards in the report: ~10 kB each, so a wide run's report stays a few MB


def latent_cards(index: RunIndex, limit: int | None = MAX_CARDS) -> tuple[list[dict], int]:
    """The report's card per Stage 2 / Stage 3 latent (Stage 1 candidates are listed, not carded),
    at most `limit` of them: those critical for the most prompts (a wide run's Stage 3 sets
    reach 10^4-10^5 latents; the web app shows them all). Returns (cards, latents carded or not)."""
    rows = [r for r in index.latents.values() if {"2", "3"} & set(r.stages)]
    total = len(rows)
    if limit is not None and total > limit:
        rows = sorted(rows, key=lambda r: (-r.n_prompts, "2" not in r.stages, r.layer, r.index))[:limit]
        rows.sort(key=lambda r: (r.layer, r.index))
    out = []
    for row in rows:
        board = index.dashboards.get(row.id)
        deltas = [e["delta_alone"] for e in (board.effects if board else []) if e.get("delta_alone") is not None]
        out.append(
            {
                "row": row,
                "board": board,
                "critical": sorted(set(row.prompts.get("2", [])) | set(row.prompts.get("3", []))),
                "mean_delta": sum(deltas) / len(deltas) if deltas else None,
                "n_effects": len(deltas),
            }
        )
    return out, total


def build_report(run_dir: str | os.PathLike) -> str:
    """The report of a run directory as one HTML string."""
    from .. import __version__

    results = RunResults(run_dir)
    index = RunIndex(results)
    cards, n_critical = latent_cards(index)
    carded = {c["row"].id for c in cards}

    def latent_url(fid) -> str:
        fid = str(fid)
        return f"#latent-{fid}" if fid in carded else "#latents"

    env = environment()
    env.globals.update(latent_url=latent_url, prompt_url=lambda pid: f"#prompt-{pid}", linkable=carded)
    cfg = results.config()
    return env.get_template("report.html").render(
        version=__version__, run_name=cfg.name if cfg else Path(results.root).name, run_path=str(results.root),
        written=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), css=stylesheet(),
        sections=build_sections(results, latent_url), prompts=[index.prompt(pid) for pid in index.prompts],
        latents=cards, n_critical=n_critical, dashboards_done=results.done("dashboards"), downloads=_downloads(results))


def _downloads(results: RunResults) -> dict:
    """Per prompt with a Stage 2 set, its exports as data: URIs (the report has no server)."""
    if not results.done("stage2"):
        return {}
    from ..export.downloads import data_uris

    sets = [f"stage2/{pid}" for pid, fs in results.stage2_sets().items() if len(fs)]
    return {name.split("/", 1)[1]: d for name, d in data_uris(results, sets).items()}


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report (default: RUN_DIR/report.html) atomically; returns its path."""
    RunResults(run_dir).store.verify_all()  # no run, or a damaged artifact: one line before the output path
    path = check_writable(Path(out) if out is not None else Path(run_dir) / "report.html", "-o")
    return atomic_write_text(path, build_report(run_dir))
