"""Rich tables for the terminal: one generic printer plus the demo world's two quality tables."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table

console = Console()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    if not rows:
        console.print(f"[bold]{title}[/bold]: (empty)")
        return
    columns = list(columns or rows[0].keys())
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(str(c), justify="right" if isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in columns])
    console.print(table)


def print_quality(quality: dict) -> None:
    rows = [{"set": r["set"], "n": r["n"], "refused %": round(100 * r["refused"], 1),
             "degenerate %": round(100 * r["degenerate"], 1), "mean P(I)": r["mean_p_I"]}
            for r in quality["rows"]]
    print_table(f"Demo model refusal rates ({quality['judge']} judge, greedy, "
                f"{quality['max_new_tokens']} tokens)", rows)


def print_sae_quality(sae_quality: dict) -> None:
    rows = [{"layer": int(l), "explained var": q["explained_variance"], "L0": q["l0"],
             "dead %": round(100 * q["dead_fraction"], 2), "CE base": q["ce_base"],
             "CE spliced": q["ce_spliced"], "CE +": q["ce_increase"]}
            for l, q in sorted(sae_quality["layers"].items(), key=lambda kv: int(kv[0]))]
    print_table(f"Demo SAEs (JumpReLU, {sae_quality.get('d_sae')} latents, trained on "
                f"{sae_quality.get('train_tokens')} tokens)", rows)
