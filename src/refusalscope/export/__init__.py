"""`refusalscope export`: what a run found, written in the forms other tools read.

FORMATS maps a `--to` name to (module, function, what it writes); every writer has the signature
`write(run_dir: Path, out: Path, **opts) -> dict` (a summary naming the files written), so adding
a format is one line here and one module beside this one. Modules are imported on first use.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError

FORMATS: dict[str, tuple[str, str, str]] = {
    "neuronpedia": ("neuronpedia", "write", "quick-list URLs, list-API bodies and the refusal direction as a vector"),
    "lm-eval": ("lmeval", "write", "steering CSVs for lm-evaluation-harness's `steered` model"),
    "saelens": ("saelens", "write", "a JSON + safetensors bundle a SAELens / TransformerLens user applies"),
    "steering": ("steering", "write", "steering vectors (safetensors) for the steering-vectors package"),
    "model": ("abliterate", "export_model", "the model with the refusal direction orthogonalised out of its "
              "weights (abliteration), a plain HuggingFace folder"),
    "tables": ("tables", "write", "every paper table and the eval matrix as CSV, paper tables as LaTeX"),
}


def writer(fmt: str) -> Callable[..., dict]:
    """The writer of format `fmt`; a one-line error naming the formats for an unknown one."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    module, function, _ = FORMATS[fmt]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def check_out(out: Path) -> Path:
    """`out` as a folder that exists and can be written, or a one-line error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: pass a folder for -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out} ({err.strerror}): pass a writable folder for -o") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{out} is not writable: pass a writable folder for -o")
    return out


def export(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, **opts) -> dict:
    """Write run `run_dir` as format `fmt` into folder `out` (default: RUN/exports/FMT)."""
    write = writer(fmt)
    from ..run.results import RunResults

    run_dir = RunResults(run_dir).root  # a one-line error when it holds no run
    target = check_out(Path(out) if out is not None else run_dir / "exports" / fmt)
    return {"format": fmt, "out": str(target), **write(run_dir, target, **opts)}
