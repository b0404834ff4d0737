"""`--to tables`: every table the terminal, report and web app show (interfaces/tables.py's
(title, rows) per stage) as one CSV each, the paper's tables ("Table N…") also as LaTeX, and the
eval matrix (one row per intervention × dataset part) as CSV, for people writing papers."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from ..artifacts import atomic_write_text
from ..run.results import RunResults

_LATEX_SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                   "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:60] or "table"


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def latex_escape(text: object) -> str:
    return "".join(_LATEX_SPECIALS.get(c, c) for c in str(text))


def to_latex(title: str, rows: list[dict]) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); numbers right-aligned."""
    cols = _columns(rows)
    num = [all(isinstance(r.get(c), (int, float)) for r in rows if r.get(c) is not None) for c in cols]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(title)}}}",
             r"\begin{tabular}{" + "".join("r" if n else "l" for n in num) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape("" if r.get(c) is None else r.get(c)) for c in cols) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def run_tables(res: RunResults) -> list[tuple[str, str, list[dict]]]:
    """(stage, title, rows) of every finished stage, in pipeline order."""
    from ..interfaces.tables import summary_tables

    summaries = {s: res.summary(s) for s in res.stages() if res.done(s)}
    return [(stage, title, [dict(r) for r in rows]) for stage, tables in summary_tables(summaries).items()
            for title, rows in tables if rows]


def write(run_dir: Path, out: Path, **_: object) -> dict:
    res = RunResults(run_dir)
    files = []
    for stage, title, rows in run_tables(res):
        name = f"{stage}__{slug(title)}"
        atomic_write_text(out / f"{name}.csv", to_csv(rows))
        files.append(f"{name}.csv")
        if title.startswith(("Table ", "Tables ")):
            atomic_write_text(out / f"{name}.tex", to_latex(title, rows))
            files.append(f"{name}.tex")
    notes = []
    if res.done("eval"):
        atomic_write_text(out / "eval__matrix.csv", res.eval_table().to_csv(index=False))
        files.append("eval__matrix.csv")
    else:
        notes.append("no eval matrix: `refusalscope eval` has not run on this run directory")
    return {"files": files, "notes": notes}
