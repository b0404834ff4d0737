"""What every catalogue row is made of: the Row itself, the Case its setup changes, and the setup
helpers the groups share (tests/catalogue/*.py hold the rows, grouped by class of mistake)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Case:
    """What a row's setup may change: the config (a dict), files under tmp, extra placeholders."""

    world: Path
    tmp: Path
    cfg: dict
    extra: dict = field(default_factory=dict)
    monkeypatch: object = None
    holder: subprocess.Popen | None = None


@dataclass
class Row:
    id: str
    mistake: str
    args: str
    message: str
    setup: Callable[[Case], None] | None = None
    code: int = 2
    fast: bool = True  # fails before any stage runs
    given: str = ""  # the mistake as the user wrote it (default: what the setup says)

    def shown_input(self) -> str:
        return self.given or getattr(self.setup, "given", "")


def cfg(**sections):
    def setup(c: Case) -> None:
        for section, values in sections.items():
            if isinstance(values, dict):
                c.cfg.setdefault(section, {}).update(values)
            else:
                c.cfg[section] = values
    setup.given = yaml.safe_dump(sections, default_flow_style=True, width=1000).strip()[1:-1]
    return setup


def write(name: str, content: str | bytes, key: str = "harmful_test"):
    def setup(c: Case) -> None:
        path = c.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        c.cfg["data"][key] = str(path)
    text = content.decode("latin-1") if isinstance(content, bytes) else content
    setup.given = f"data.{key}: {name}, holding {text[:70]!r}{'…' if len(text) > 70 else ''}"
    return setup


def sae_copy(change: Callable[[Path], None]):
    def setup(c: Case) -> None:
        shutil.copytree(c.world / "saes", c.tmp / "saes")
        c.cfg["saes"]["path"] = str(c.tmp / "saes" / "layer_{layer}")
        change(c.tmp / "saes")
    return setup


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))



LONG = " ".join(["Explain in detail how to open a lock"] * 40)
RUN = "run -c {cfg} -r {run} -q"
