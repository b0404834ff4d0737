"""`refusalscope export`: a run's findings in other tools' formats (see refusalscope.export)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..export import FORMATS
from .cli import app, friendly

_FORMATS_HELP = "; ".join(f"{k}: {v[2]}" for k, v in FORMATS.items())


@app.command("export")
@friendly
def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory (written by `refusalscope run`)."),
    to: str = typer.Option(..., "--to", help=f"Format. {_FORMATS_HELP}."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder to write (default: RUN_DIR/exports/FORMAT)."),
    sets: list[str] | None = typer.Option(
        None, "--sets", help="stage1, stage2, stage3 (one set per prompt), core@K (the K latents most often in a "
                             "Stage 2 set) or a prompt id; repeat for several (default: stage2)."),
    intervention: str = typer.Option("ablate", "--intervention",
                                     help="saelens bundle: ablate, clamp=VALUE (at BOS) or scale=FACTOR."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Write what a run found in a form another tool reads (Neuronpedia, lm-eval, SAELens, steering-vectors,
    CSV/LaTeX)."""
    from ..export import export

    result = export(run_dir, to, out, sets=sets, intervention=intervention)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    for note in result.get("notes", []):
        print(f"note: {note}")
    print(f"{to}: {len(result.get('files', []))} file(s) in {result['out']}")
