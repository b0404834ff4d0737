"""Property-based fuzzing of every way input reaches refusalscope: the config file (strategies derived
from the pydantic schema: wrong types, out-of-range numbers, unknown keys, nested damage, raw text),
prompt files (random bytes, encodings, CSV / JSONL / JSON shapes, huge fields, empty rows, labels)
and the CLI's options. The property: exit code 0 or 2, a failure is one line `error: ...: <fix>`,
never a traceback, and nothing written outside the run (or the output file a command was given).

Commands run in-process (typer's CliRunner) up to the end of preflight: the first stage is replaced
by a stop, so an example costs config loading and input checks, no model work. Shared by the `ci`
profile (tests/test_fuzz.py) and the `long` one (benchmarks/fuzz_b12.py, benchmark B12).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.run import preflight as preflight_mod
from refusalscope.run import runner
from refusalscope.run.config import Config


class PreflightPassed(Exception):
    """Raised where the first stage would start: every input was accepted."""


# ----------------------------------------------------------------- the property
@dataclass
class Outcome:
    code: int
    line: str = ""
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return not self.traceback


@dataclass
class Sandbox:
    """A scratch folder per fuzz session with the tiny world's files and a finished run in it."""

    root: Path
    world: Path
    reference: Path
    base: dict = field(default_factory=dict)
    n: int = 0

    def fresh(self) -> Path:
        self.n += 1
        ex = self.root / f"ex-{self.n}"
        ex.mkdir()
        return ex


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@contextlib.contextmanager
def stop_after_preflight() -> Iterator[None]:
    """Preflight runs as in a real command, then stops the command before any stage; the model's
    config and tokenizer are read once per model section (the fuzzed part is everything else)."""
    real_pre, real_info = runner.preflight, preflight_mod.model_info
    cache: dict[str, Any] = {}

    def info(cfg):
        key = cfg.model.model_dump_json()
        if key not in cache:
            cache[key] = real_info(cfg)
        return cache[key]

    def pre(ctx, stages):
        real_pre(ctx, stages)
        raise PreflightPassed()

    runner.preflight, preflight_mod.model_info = pre, info
    try:
        yield
    finally:
        runner.preflight, preflight_mod.model_info = real_pre, real_info


def invoke(args: list[str], cwd: Path, allowed: list[Path], watched: list[Path]) -> Outcome:
    """Run `refusalscope ARGS` in `cwd` and judge it (see the module docstring). `allowed`: where the
    command may write; `watched`: folders that must be left as they were (outside `allowed`)."""
    before = {w: _files(w) for w in watched}
    with contextlib.chdir(cwd):
        res = CliRunner().invoke(app, args, catch_exceptions=True)
    exc = res.exception
    if isinstance(exc, PreflightPassed):
        out = Outcome(0)
    elif exc is not None and not isinstance(exc, SystemExit):
        out = Outcome(1, traceback="".join(traceback.format_exception(exc)))
    else:
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        out = Outcome(res.exit_code, lines[0] if lines else "")
        if res.exit_code not in (0, 2):
            out.traceback = f"exit {res.exit_code}: {res.output[-2000:]}"
        elif res.exit_code == 2 and not (len(lines) == 1 and lines[0].startswith("error: ")
                                         and ": " in lines[0][len("error: "):]):
            out.traceback = f"not one line naming the fix: {res.stderr[-2000:]}"
    for w in watched:
        new = [p for p in _files(w) - before[w] if not any(p.is_relative_to(a) for a in allowed)]
        if new:
            out.traceback += f"\nwrote outside the run: {sorted(map(str, new))[:3]}"
    return out


# ----------------------------------------------------------------- config strategies (from the schema)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=8)
EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2, -(2**63), 2**63, 10**30, 0.5, -0.0, 1e308, math.inf, -math.inf, math.nan])
NO_WORK_SECTIONS = ("execution",)  # ray would start a cluster: the backend is fuzzed through the CLI's options


def schema_fields() -> dict[str, Any]:
    """'section.field' -> annotation, for every field of every config section."""
    out: dict[str, Any] = {}
    for name, f in Config.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub, g in ann.model_fields.items():
                out[f"{name}.{sub}"] = g.annotation
        else:
            out[name] = ann
    return {k: v for k, v in out.items() if k.split(".")[0] not in NO_WORK_SECTIONS}


def _literals(ann) -> list:
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    return [x for a in get_args(ann) for x in _literals(a)]


@functools.cache
def _field_values(ann_repr: str, ann: Any) -> st.SearchStrategy:
    near = _literals(ann)
    base = JSON | EDGE_NUMBERS | st.text(max_size=30)
    if near:  # a closed set: its values, near misses and other strings
        base = base | st.sampled_from(near) | st.sampled_from(near).map(lambda v: f"{v}x" if isinstance(v, str) else v)
    return base | st.lists(base, max_size=3)


def mutation(fields: dict[str, Any]) -> st.SearchStrategy:
    keys = sorted(fields)
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    set_field = st.tuples(st.just("set"), st.sampled_from(keys)).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), _field_values(repr(fields[t[1]]), fields[t[1]])))
    unknown = st.tuples(st.just("unknown"), st.sampled_from(["", *sections]), st.text(min_size=1, max_size=10))
    section = st.tuples(st.just("section"), st.sampled_from(sections), JSON)
    drop = st.tuples(st.just("drop"), st.sampled_from(keys), st.none())
    preset = st.tuples(st.just("preset"), st.just(""), st.sampled_from(["demo", "nope", "", "gemma-2-2b-it"]) | JSON)
    return set_field | unknown | section | drop | preset


def apply(cfg: dict, mut: tuple) -> dict:
    kind, key, value = mut
    cfg = json.loads(json.dumps(cfg))
    sec, _, name = key.partition(".")
    if kind == "set":
        if name and not isinstance(cfg.get(sec), dict):
            cfg[sec] = {}
        (cfg[sec] if name else cfg)[name or sec] = value
    elif kind == "unknown":
        target = cfg.setdefault(key, {}) if key else cfg
        if isinstance(target, dict):
            target[value] = 1
    elif kind == "section":
        cfg[key] = value
    elif kind == "drop":
        target = cfg.get(sec) if name else cfg
        if isinstance(target, dict):
            target.pop(name or sec, None)
    else:
        cfg["preset"] = value
    return cfg


def config_texts(base: dict) -> st.SearchStrategy:
    """A config file's text: the tiny world's config after 1-3 mutations, or raw damage."""
    fields = schema_fields()
    mutated = st.lists(mutation(fields), min_size=1, max_size=3).map(
        lambda muts: yaml.safe_dump(functools.reduce(apply, muts, base), allow_unicode=True))
    raw = st.text(max_size=200) | st.sampled_from(["", "\n", "- a\n- b\n", "model: [1, 2\n", "42", "null", "{{"])
    return mutated | raw


# ----------------------------------------------------------------- prompt-file strategies
EXTENSIONS = [".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet", ".yaml", ""]
TEXT = st.text(max_size=40) | st.sampled_from(["", " ", "\x00", "a,b", '"q"', "\n\n", "é" * 10, "x" * 20000])
LABELS = st.sampled_from(["harmful", "unsafe", "safe", "benign", "maybe", "", "HARMFUL", "1"]) | TEXT


def _csv(rows: list[list[str]], sep: str) -> str:
    def cell(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in (sep, '"', "\n")) else v
    return "\n".join(sep.join(cell(c) for c in r) for r in rows) + "\n"


def prompt_files() -> st.SearchStrategy:
    """(file name, bytes): random bytes, text in several encodings, tables of random shape."""
    header = st.lists(st.sampled_from(["prompt", "instruction", "goal", "label", "category", "id", "text", "x"]) | TEXT,
                      min_size=0, max_size=4)
    table = st.tuples(header, st.lists(st.lists(TEXT | LABELS, max_size=5), max_size=6))
    csv_text = st.tuples(table, st.sampled_from([",", "\t"])).map(lambda t: _csv([t[0][0], *t[0][1]], t[1]))
    record = st.dictionaries(st.sampled_from(["prompt", "instruction", "label", "id", "category", "goal"]) | TEXT,
                             TEXT | LABELS | JSON, max_size=4)
    jsonl = st.lists(record | JSON, max_size=6).map(lambda rs: "".join(json.dumps(r) + "\n" for r in rs))
    js = (st.lists(record | JSON, max_size=6) | JSON).map(json.dumps)
    lines = st.lists(TEXT, max_size=8).map("\n".join)
    texts = csv_text | jsonl | js | lines
    encoded = st.tuples(texts, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])).map(
        lambda t: t[0].encode(t[1], errors="replace"))
    cut = st.tuples(texts, st.integers(0, 200)).map(lambda t: t[0].encode()[: t[1]])
    content = encoded | cut | st.binary(max_size=300)
    return st.tuples(st.sampled_from(EXTENSIONS), content)


def prompt_case(base: dict) -> st.SearchStrategy:
    """(config, file name, bytes): one prompt file in a place the config reads one, maybe a text field."""
    places = ["data.harmful_test", "data.harmless_train", "stage3.harmful", "analyses.taxonomy_prompts",
              "eval.datasets"]
    return st.tuples(st.sampled_from(places), prompt_files(), st.none() | st.sampled_from(["prompt", "x", "label"]))


def place_file(base: dict, ex: Path, case) -> list[str]:
    """Write the case's file into `ex` and a config naming it; returns the CLI args."""
    where, (ext, content), text_field = case
    path = ex / f"prompts{ext}"
    path.write_bytes(content)
    cfg = json.loads(json.dumps(base))
    sec, name = where.split(".")
    cfg.setdefault(sec, {})[name] = [str(path)] if name in ("harmful", "taxonomy_prompts", "datasets") else str(path)
    if text_field:
        cfg.setdefault("data", {})["text_field"] = text_field
    (ex / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    command = "eval" if where == "eval.datasets" else "run"
    return [command, "-c", str(ex / "cfg.yaml"), "-r", str(ex / "run"), "-q"]


# ----------------------------------------------------------------- CLI-option strategies
# random names stay inside the example's folder (the command runs there): no folder made at / or ~
RELATIVE = st.text(max_size=12).map(lambda s: s.lstrip("/~") or "x").filter(lambda s: "{" not in s and "\x00" not in s)
def cli_args(sandbox: Sandbox) -> st.SearchStrategy:
    """A command line: a command and options drawn from what the CLI declares, values right or wrong."""
    paths = st.sampled_from(["{ex}/run", "{ex}/new/deeper", "{ref}", "{ex}", "/proc/1/forbidden", "{world}/cfg.yaml",
                             "{ex}/out.html", "", "-", "{ex}/missing.yaml"]) | RELATIVE
    configs = st.sampled_from(["{world}/cfg.yaml", "demo", "nope", "{ex}/missing.yaml", "", "{ref}"]) | RELATIVE
    words = st.text(max_size=12) | st.sampled_from(["hydra", "dashboards", "heldout", "none", "core,magic", "0", "-1"])
    opts = st.lists(st.one_of(
        st.tuples(st.just("-c"), configs), st.tuples(st.just("-r"), paths), st.tuples(st.just("-o"), paths),
        st.tuples(st.just("--backend"), st.sampled_from(["local", "dask", ""]) | st.text(max_size=6)),
        st.tuples(st.just("--address"), st.sampled_from(["auto", "ray://127.0.0.1:9", "x:y"])),
        st.tuples(st.just("--workers"), st.sampled_from(["0", "-3", "two", "1"])),
        st.tuples(st.just("--datasets"), words), st.tuples(st.just("--interventions"), words),
        st.tuples(st.just("--port"), st.sampled_from(["-1", "70000", "http"])),
        st.tuples(st.sampled_from(["--json", "-q", "--no-deps", "--accept-version", "--bogus"])),
        st.tuples(words)), max_size=5)
    commands = st.sampled_from([["run"], ["filter"], ["direction"], ["stage1"], ["stage2"], ["stage3"], ["analyze"],
                                ["eval"], ["report", "{ref}"], ["report", "{ex}"], ["compare", "{ref}", "{ex}"],
                                ["config", "validate"], ["config", "show"], ["serve", "{ex}"], ["bogus"]])
    return st.tuples(commands, opts).map(lambda t: [*t[0], *[x for o in t[1] for x in o]])


def fill(args: list[str], sandbox: Sandbox, ex: Path) -> list[str]:
    out = [a.format(ex=ex, ref=sandbox.reference, world=sandbox.world) if "{" in a and "}" in a else a for a in args]
    if out[0] == "serve" and "--port" not in out:
        out += ["--port", "-1"]  # serve that got past its checks would serve forever: stop it at the port check
    if out[0] in ("run", "filter", "direction", "stage1", "stage2", "stage3", "analyze", "eval"):
        out = [a if a != "ray" else "local" for a in out]  # the ray backend would start a cluster
    return out


def cli_allowed(args: list[str], ex: Path) -> list[Path]:
    """Where a command line may write: its run directory (-r, else runs/<name>) and its -o file."""
    allowed = [ex]
    for flag, value in zip(args, args[1:]):
        if flag in ("-r", "-o", "--run", "--out"):
            allowed.append(Path(value) if Path(value).is_absolute() else ex / value)
    if args[:1] == ["report"] and len(args) > 1:
        allowed.append(Path(args[1]) / "report.html")
    return allowed


def make_sandbox(root: Path, world: Path, reference: Path) -> Sandbox:
    ref = root / "ref"
    shutil.copytree(reference, ref)
    base = yaml.safe_load((world / "cfg.yaml").read_text())
    return Sandbox(root, world, ref, base)


def check(out: Outcome, what: Callable[[], str]) -> None:
    assert out.ok, f"{what()}\n{out.traceback}"


# ----------------------------------------------------------------- the three targets
def target_config(sandbox: Sandbox, data) -> tuple[Outcome, str]:
    ex = sandbox.fresh()
    text = data.draw(config_texts(sandbox.base), label="config")
    (ex / "cfg.yaml").write_text(text, encoding="utf-8")
    out = run_example(["run", "-c", str(ex / "cfg.yaml"), "-r", str(ex / "run"), "-q"], sandbox, ex, [ex])
    return out, text


def target_prompts(sandbox: Sandbox, data) -> tuple[Outcome, str]:
    ex = sandbox.fresh()
    case = data.draw(prompt_case(sandbox.base), label="prompt file")
    out = run_example(place_file(sandbox.base, ex, case), sandbox, ex, [ex])
    return out, repr(case)[:2000]


def target_cli(sandbox: Sandbox, data) -> tuple[Outcome, str]:
    ex = sandbox.fresh()
    args = fill(data.draw(cli_args(sandbox), label="args"), sandbox, ex)
    return run_example(args, sandbox, ex, cli_allowed(args, ex)), repr(args)


TARGETS = {"config": target_config, "prompts": target_prompts, "cli": target_cli}


def run_example(args: list[str], sandbox: Sandbox, ex: Path, allowed: list[Path]) -> Outcome:
    try:
        with stop_after_preflight():
            return invoke(args, ex, allowed, [sandbox.root, sandbox.world])
    finally:
        shutil.rmtree(ex, ignore_errors=True)
