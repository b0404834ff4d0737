"""Markdown for the two generated reference pages: the config schema (from the pydantic models of
`run/config.py`, with every preset's non-default values) and the CLI (from the typer app).

Generated at build time by the site's hook (`hooks.py`), so the pages can never drift from the
code; `python docs/_tools/reference.py config|cli` prints one of them.
"""

from __future__ import annotations

import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def _cell(text: Any, code: bool = False) -> str:
    """One Markdown table cell: pipes escaped, newlines folded, and outside code spans `<`, `>`
    escaped (`runs/<config name>` is no HTML tag)."""
    out = str(text).replace("|", "\\|").replace("\n", " ")
    return out if code else out.replace("<", "&lt;").replace(">", "&gt;")


def _code(value: Any) -> str:
    if value is None:
        return "`None`"
    return f"`{_cell(value, code=True)}`" if value != "" else "`''`"


def _type_name(annotation: Any) -> str:
    """A short, readable type: `list[int] | 'all'` rather than typing's repr."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(info: FieldInfo) -> str:
    bits = []
    for m in info.metadata:
        for name, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            v = getattr(m, name, None)
            if v is not None:
                bits.append(f"{sym} {v}")
    return ", ".join(bits)


def _flatten(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


# One line per section: what it configures and where the docs explain it (links relative to reference/).
SECTION_NOTES = {
    "model": "The chat model dissected, and how it is run ([Getting started](../getting-started.md#on-a-gpu)).",
    "saes": "The SAEs, one per layer; layer L is the output of decoder layer L "
            "([What an intervention does](../semantics.md)).",
    "data": "The prompt sets: files, `bundled:NAME[:SPLIT]`, saved `datasets` folders or `hf:ID[:CONFIG][::SPLIT]`.",
    "judge": "What decides refused / jailbroken / degenerate "
             "([Beyond the paper](../paper-fidelity.md#judging-replies)).",
    "generation": "Replies generated for every judged verdict.",
    "direction": "The refusal direction and the choice of l* ([Beyond the paper](../paper-fidelity.md#choosing-l)).",
    "stage1": "Stage 1: top-K latents aligned with r̂ per layer, and the K ladder ([The method](../method.md)).",
    "stage2": "Stage 2: Algorithm 1 ([Beyond the paper](../paper-fidelity.md#stage-2-the-set-a-prompt-keeps)).",
    "stage3": "Stage 3: the factorization machine, its ranking and the K sweep "
              "([Beyond the paper](../paper-fidelity.md#stage-3-rows-scaling-ranking-and-table-2)).",
    "analyses": "The paper's analyses after Stage 3 ([The method](../method.md#analyses)).",
    "eval": "`refusalscope eval` ([Evaluating interventions](../evaluation.md)).",
    "execution": "Where per-prompt work runs ([Scaling out and GPUs](../scaling.md)).",
}


def config_markdown() -> str:
    from refusalscope.run.config import Config, config_from_dict, preset_names

    default = Config()
    flat_default = _flatten(default)
    presets = {p: _flatten(config_from_dict({"preset": p}, f"preset {p}")) for p in preset_names()}
    lines = [
        "# Configuration reference",
        "",
        "*Generated from the pydantic schema in `src/refusalscope/run/config.py` when the site is built.*",
        "",
        "A run is configured by one YAML file of the sections below. Unknown keys are rejected with",
        "the key named; `preset: NAME` starts from a preset and the file overrides any field",
        "(`refusalscope config show NAME` prints a preset with every default filled in). The",
        "**presets** column lists the presets whose value differs from the default, and that value.",
        "Which stage reads which field (and so reruns when it changes) is on",
        "[Artifacts and stage inputs](../artifacts.md).",
        "",
        f"Presets: {', '.join(f'`{p}`' for p in presets)}.",
        "",
    ]
    top = [(n, f) for n, f in Config.model_fields.items() if not isinstance(getattr(default, n), BaseModel)]
    sections = [(n, f) for n, f in Config.model_fields.items() if isinstance(getattr(default, n), BaseModel)]

    def table(rows: list[tuple[str, FieldInfo]], prefix: str) -> list[str]:
        out = ["| key | type | default | presets | what it is |", "|---|---|---|---|---|"]
        for name, info in rows:
            key = f"{prefix}{name}"
            diffs = [f"{p}: {_code(v[key])}" for p, v in presets.items() if v[key] != flat_default[key]]
            desc = info.description or ""
            cons = _constraints(info)
            if cons:
                desc = f"{desc} ({cons})" if desc else f"({cons})"
            out.append(f"| `{key}` | {_cell(_type_name(info.annotation))} | {_code(flat_default[key])} | "
                       f"{'<br>'.join(diffs)} | {_cell(desc)} |")
        return out

    lines += ["## Top level", "", *table(top, ""), ""]
    for name, _ in sections:
        section = getattr(default, name)
        doc = (type(section).__doc__ or "").strip()
        lines += [f"## `{name}`", ""]
        if doc and not doc.startswith("Usage docs"):
            lines += [doc.splitlines()[0], ""]
        elif name in SECTION_NOTES:
            lines += [SECTION_NOTES[name], ""]
        lines += [*table(list(type(section).model_fields.items()), f"{name}."), ""]
    return "\n".join(lines)


def _param_type(param: Any) -> str:
    """click's type name, or (typer >= 0.29 keeps it elsewhere) the annotation's."""
    if hasattr(param, "type"):
        return str(param.type.name).lower()
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return _type_name(annotation).lower() if annotation is not None else ""


def _option_row(param: Any) -> str:
    names = ", ".join(f"`{o}`" for o in [*param.opts, *getattr(param, "secondary_opts", [])])
    help_text = getattr(param, "help", None) or ""
    default = param.default
    if callable(default) or default in (None, False, ()) or getattr(param, "is_flag", False):
        shown = ""
    else:
        shown = _code(default)
    kind = "flag" if getattr(param, "is_flag", False) else _cell(_param_type(param))
    return f"| {names} | {kind} | {shown} | {_cell(help_text)} |"


def _context(cmd: Any, name: str) -> Any:
    # typer vendors its own click: take the command's own Context class, never `import click`
    return cmd.context_class(cmd, info_name=name)


def _command_section(cmd: Any, path: list[str], level: int) -> list[str]:
    ctx = _context(cmd, " ".join(path))
    usage = " ".join([*path, *cmd.collect_usage_pieces(ctx)])
    lines = [f"{'#' * level} `{' '.join(path)}`", ""]
    if cmd.help:
        lines += [cmd.help.strip(), ""]
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                lines += _command_section(sub, [*path, name], level + 1)
        return lines
    lines += ["```text", usage, "```", ""]
    args = [p for p in cmd.params if p.param_type_name == "argument"]
    opts = [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]
    if args:
        lines += ["| argument | what it is |", "|---|---|",
                  *(f"| `{a.name.upper()}` | {_cell(getattr(a, 'help', None) or '')} |" for a in args), ""]
    if opts:
        lines += ["| option | type | default | what it does |", "|---|---|---|---|",
                  *(_option_row(p) for p in opts), ""]
    return lines


def cli_markdown() -> str:
    import typer

    from refusalscope.interfaces.cli import app

    root = typer.main.get_command(app)
    ctx = _context(root, "refusalscope")
    lines = ["# CLI reference", "",
             "*Generated from the typer app in `src/refusalscope/interfaces/cli.py` when the site is built.*", "",
             root.help.strip() if root.help else "", "",
             "Every command takes `--quiet`; the ones that report take `--json`. Bad input ends in one line",
             "that says what to fix, with exit code 2 (the [error catalogue](../errors.md) lists them).", ""]
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        if cmd is not None and not cmd.hidden:
            lines += _command_section(cmd, ["refusalscope", name], 2)
    return "\n".join(lines)


def stage_inputs_markdown() -> str:
    """What each stage's declaration (`run/stages.py`) says it reads, so what reruns it."""
    from refusalscope.run.stages import STAGES

    lines = ["| stage | config fields it reads | files it reads (by content: prompt sets, Neuronpedia bundles) | "
             "stages it reads | "
             "read when the config runs them |", "|---|---|---|---|---|"]
    for name, stage in STAGES.items():
        spec = stage.inputs
        def cells(xs):
            return ", ".join(f"`{x}`" for x in xs) or "–"
        lines.append(f"| `{name}` | {cells(spec.keys)} | {cells(spec.files + spec.bundles)} | {cells(spec.deps)} | "
                     f"{cells(spec.optional)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "config"
    print({"config": config_markdown, "cli": cli_markdown, "inputs": stage_inputs_markdown}[which]())
