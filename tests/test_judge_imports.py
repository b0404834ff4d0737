"""The judge registry's imports point one way: `measures/judges.py` imports the judge modules, and no
judge module imports the registry back (it once did, through bottom-of-file imports, so importing a
judge module first half-initialised the registry). Read from the source: every import, at module
level or inside a function, between modules of `refusalscope.measures`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import refusalscope.measures as measures

PKG = Path(measures.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module -> the modules of the measures package it imports (anywhere in its body)."""
    out = {}
    for path in PKG.glob("*.py"):
        got = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                got |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refusalscope.measures."):
                got.add(node.module.rsplit(".", 1)[1])
        out[path.stem] = got
    return out


def test_no_judge_module_imports_the_registry_and_the_graph_has_no_cycle():
    graph = _imports()
    assert {"cascade", "classifier_judge", "guard_judge", "simple_judges"} <= graph["judges"]
    assert [m for m, deps in graph.items() if "judges" in deps] == []
    state: dict[str, int] = {}

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert state.get(m) != 1, f"import cycle: {' -> '.join((*path, m))}"
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in graph.get(m, ()):
            visit(d, (*path, m))
        state[m] = 2

    for m in graph:
        visit(m, ())


def test_each_judge_module_imports_first_in_a_fresh_process():
    """Imported on its own, before the registry, every judge module loads, and the registry then
    knows every built-in judge."""
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    importlib.import_module('refusalscope.measures.' + m)\n"
            "from refusalscope.measures.judges import judge_names\n"
            "print(' '.join(judge_names()))\n")
    for first in ("guard_judge", "classifier_judge", "cascade", "simple_judges"):
        proc = subprocess.run([sys.executable, "-c", code, first], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["classifier", "first-token", "llama-guard", "opening", "substring"]
