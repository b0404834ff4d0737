"""Turn a config into live objects: the chat model, its SAEs, and the prompt sets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.model import ChatModel, load_chat_model
from ..io.prompts import Prompt, bundled_names, load_bundled, load_prompts, sample
from ..io.sae_lazy import LazySAESet, lazy_sae_set
from ..io.sae_loading import expand_specs
from .config import Config


def chat_template_text(value: str | None) -> str | None:
    """`model.chat_template`: the Jinja text itself, or a file that holds it."""
    if not value or "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"model.chat_template {value!r} is neither a Jinja template nor a file: pass the "
                        "template text or the path of a file that holds it")
    return path.read_text(encoding="utf-8")


def load_model(cfg: Config, quiet: bool = False, log=print) -> ChatModel:
    m = cfg.model
    if quiet:  # transformers' own "Loading weights" bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if m.trust_remote_code:
        log(f"model.trust_remote_code is on: the code in {m.source} runs in this process")
    if m.source == "demo":
        from ..demo.world import build_world, is_built, load_demo_model

        if not is_built():
            log("the demo world is not built yet: building it now (one time, about 20 minutes)")
            build_world(quiet=quiet, log=log)
        model = load_demo_model(device=m.device, system_prompt=m.system_prompt,
                                refusal_tokens=m.refusal_tokens, compile=cfg.execution.compile)
    else:
        model = load_chat_model(m.source, gguf_file=m.gguf_file, dtype=m.dtype, device=m.device,
                                system_prompt=m.system_prompt, refusal_tokens=m.refusal_tokens,
                                quiet=quiet, chat_template=chat_template_text(m.chat_template),
                                trust_remote_code=m.trust_remote_code, compile=cfg.execution.compile)
    model.log = log  # out-of-memory retries say so in the run's log
    return model


def sae_layers(cfg: Config, n_layers: int, name: str) -> list[int]:
    layers = cfg.saes.layers
    if layers == "all":
        if cfg.saes.source == "demo":
            from ..demo.world import demo_layers

            return demo_layers(n_layers=n_layers)
        return list(range(n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UserError(f"saes.layers has {bad}, but {name} has layers 0..{n_layers - 1}: "
                        "fix saes.layers in the config")
    if cfg.saes.source == "demo":
        from ..demo.world import demo_layers

        have = demo_layers(n_layers=n_layers)
        bad = [l for l in layers if l not in have]
        if bad:
            raise UserError(f"saes.layers has {bad}, but the demo world has SAEs at layers {have[0]}..{have[-1]} "
                            f"only: fix saes.layers in the config")
    return list(layers)


def load_saes(cfg: Config, model: ChatModel, quiet: bool = False) -> LazySAESet:
    s = cfg.saes
    layers = sae_layers(cfg, model.n_layers, model.name)
    if s.source == "demo":
        from ..demo.world import sae_dir

        specs: Mapping[Any, str] | str = {l: str(sae_dir(l)) for l in layers}
    elif s.source == "release":
        if not s.release or not s.sae_id:
            raise UserError("saes.source is 'release' but saes.release or saes.sae_id is empty: set both")
        specs = {"release": s.release, "sae_id": s.sae_id}
    else:
        if not s.path:
            raise UserError("saes.source is 'local' but saes.path is empty: set a folder template with {layer}")
        specs = s.path
    # a layer is read when a stage first asks for it (memory-mapped where the format allows), and
    # the runner releases what each stage held: Stages 1-3 never read layers above l*
    saes = lazy_sae_set(expand_specs(specs, layers), device=model.device, dtype=model.dtype)
    saes.check_against(model.d_model, model.n_layers)
    return saes


def take(items: list, n: int | None, seed: int) -> list:
    """All items when n is unset or covers them, else a seeded draw of n: bundled files are
    grouped by category, so a plain prefix would keep one category only."""
    if not n or n >= len(items):
        return list(items)
    return [items[i] for i in sorted(sample(range(len(items)), n, seed))]


_parsed: dict[tuple, list[Prompt]] = {}


def load_prompt_set(spec: str, text_field: str | None = None, label: str | None = None) -> list[Prompt]:
    """`bundled:NAME[:SPLIT]`, `hf:<dataset id>[:config][::split]`, or a file path (any format
    `load_prompts` reads). Parsed once per file version and process: the stage hash that digests
    a set and the stage that reads it share one parse (prompts are frozen)."""
    stamp = None
    if not spec.startswith("bundled:"):
        if spec.startswith("hf:") or not os.path.isfile(spec):  # hub sets and folders: datasets caches them
            return _parse_prompt_set(spec, text_field, label)
        st = os.stat(spec)
        stamp = (st.st_size, st.st_mtime_ns)
    key = (spec, text_field, label, stamp)
    if key not in _parsed:
        _parsed[key] = _parse_prompt_set(spec, text_field, label)
    return list(_parsed[key])


def _parse_prompt_set(spec: str, text_field: str | None, label: str | None) -> list[Prompt]:
    if spec.startswith("bundled:"):
        parts = spec.split(":")
        name = parts[1] if len(parts) > 1 else ""
        if name not in bundled_names():
            raise UserError(f"unknown bundled set {name!r} in {spec!r}: use one of {', '.join(bundled_names())}")
        return load_bundled(name, split=parts[2] if len(parts) > 2 else None)
    return load_prompts(spec, text_field=text_field, label=label)
