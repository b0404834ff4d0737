"""Check every input the stages of a run will read, before the first stage runs, in seconds.

A wrong SAE path found after the filter and direction stages costs minutes on the demo and hours on
a real model. So the model (config and tokenizer, no weights), the SAE folders (headers, no
weights) against the model's depth and width, every prompt file (parsed, prompt lengths against
the model's context, no repeated prompts where prompts are analysed one by one), the judge and the
Ray cluster are checked first; anything wrong is one `UserError`. The judge and backend built here
are handed to the `Context`, so nothing is built twice.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.model import ChatModel, resolve_device
from .inputs import files_of
from .pipeline import Context
from .resolve import chat_template_text, load_prompt_set, sae_layers

UNFORMATTED = {
    "analyses.ce_general",
    "dashboards.corpus",
    "eval.general_text",
}  # raw corpus texts (truncated when read), not chat prompts


@dataclass
class ModelInfo:
    name: str
    n_layers: int
    d_model: int
    context: int | None
    tokenizer: Any
    hf_config: Any = None  # for the memory estimate (run/memory.py)


class _Formatter:
    """ChatModel's own chat formatting over a tokenizer alone (no weights loaded)."""

    # borrowed methods: they read only the attributes set below (typed loosely: self is no ChatModel)
    format_chat: Callable[..., str] = ChatModel.format_chat
    _apply_template: Callable[..., Any] = ChatModel._apply_template
    _token_ids: Callable[..., list[int]] = ChatModel._token_ids

    def __init__(self, info: ModelInfo, system_prompt: str | None):
        self.tokenizer, self.name, self.system_prompt = info.tokenizer, info.name, system_prompt


def _model_source(source: str, gguf_file: str | None) -> tuple[str, dict]:
    """The folder or hub id and loader options, with the same path checks as `load_chat_model`."""
    src = Path(source).expanduser()
    if src.suffix == ".gguf":
        if not src.is_file():
            raise UserError(f"GGUF file {src} not found: check the path")
        return str(src.parent), {"gguf_file": src.name}
    if (str(source).startswith((".", "/", "~")) or src.exists()) and not src.is_dir():
        raise UserError(f"model folder {src} not found: pass a local model folder, a .gguf file or a "
                        "HuggingFace hub id")
    return (str(src) if src.exists() else source), ({"gguf_file": gguf_file} if gguf_file else {})


def model_info(cfg) -> ModelInfo | None:
    """Depth, width, context and tokenizer of the configured model, from its config and tokenizer
    files; None for the demo world before it is built (the run builds it)."""
    from transformers import AutoConfig, AutoTokenizer

    m = cfg.model
    if m.source == "demo":
        from ..demo.world import MODEL_NAME, is_built, model_dir

        if not is_built():
            return None
        kwargs: dict = {}
        where, name = str(model_dir() / "model"), MODEL_NAME
    else:
        where, kwargs = _model_source(m.source, m.gguf_file)
        name = m.source
    kwargs["trust_remote_code"] = m.trust_remote_code
    try:
        hf_cfg = AutoConfig.from_pretrained(where, **kwargs)
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not load model {m.source!r} ({first}): without network access, download it "
                        "first and pass the local folder") from None
    text = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    if m.chat_template:
        tok.chat_template = chat_template_text(m.chat_template)
    if not getattr(tok, "chat_template", None):
        raise UserError(f"model {name!r} has no chat template: use an instruction-tuned model or set "
                        "model.chat_template in the config (refusalscope needs chat-formatted prompts)")
    return ModelInfo(name, int(text.num_hidden_layers), int(text.hidden_size),
                     getattr(text, "max_position_embeddings", None), tok, hf_cfg)


def check_layers(cfg, info: ModelInfo | None, stages) -> None:
    """Layer lists in the config against the model's depth and the SAEs' layers."""
    if info is None:
        return
    if "direction" in stages and cfg.direction.layers != "auto":
        bad = [l for l in cfg.direction.layers if l >= info.n_layers]
        if bad:
            raise UserError(f"direction.layers has {bad}, but {info.name} has layers 0..{info.n_layers - 1}: fix "
                            "direction.layers in the config")
    if "stage3" in stages and cfg.stage3.layers != "auto":
        have = sae_layers(cfg, info.n_layers, info.name)
        bad = [l for l in cfg.stage3.layers if l not in have]
        if bad:
            raise UserError(f"stage3.layers has {bad}, which have no SAE (SAE layers: {have[0]}..{have[-1]}): pick "
                            "stage3.layers among the SAE layers")


def check_sae_layers(cfg, info: ModelInfo | None) -> None:
    """saes.layers against the model's depth, for every source (the demo model's depth is known
    before its world is built, so a wrong layer stops the run before the build and the filter)."""
    if info is not None:
        sae_layers(cfg, info.n_layers, info.name)
    elif cfg.saes.source == "demo" and cfg.model.source == "demo":
        from ..demo.world import DEMO_N_LAYERS, MODEL_NAME

        sae_layers(cfg, DEMO_N_LAYERS, MODEL_NAME)


def check_saes(cfg, info: ModelInfo | None) -> None:
    s = cfg.saes
    if s.source == "demo" or info is None:
        return
    layers = sae_layers(cfg, info.n_layers, info.name)
    if s.source == "release":
        if not s.release or not s.sae_id:
            raise UserError("saes.source is 'release' but saes.release or saes.sae_id is empty: set both")
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
        if s.release not in directory:
            raise UserError(f"unknown SAE release {s.release!r}: pass a release from the SAELens registry "
                            "(sae_lens.loading.pretrained_saes_directory) or saes.source: local with a folder")
        known = directory[s.release].saes_map
        for layer in layers:
            sae_id = s.sae_id.replace("{layer}", str(layer))
            if sae_id not in known:
                raise UserError(f"SAE release {s.release!r} has no sae_id {sae_id!r} (layer {layer}): fix "
                                "saes.sae_id or saes.layers")
        return
    if not s.path:
        raise UserError("saes.source is 'local' but saes.path is empty: set a folder template with {layer}")
    if "{layer}" not in s.path and len(layers) > 1:
        raise UserError(f"saes.path {s.path!r} has no {{layer}} placeholder but {len(layers)} layers were asked "
                        "for: put {layer} where the layer number goes")
    from ..io.sae_check import check_sae_folder

    for layer in layers:
        check_sae_folder(s.path.replace("{layer}", str(layer)), layer, info.d_model, info.n_layers, info.name)


def check_prompts(cfg, file_keys, info: ModelInfo | None, log) -> None:
    """Every prompt set the config fields `file_keys` name (the stages' `inputs.files`): parsed,
    within the model's context, no repeats in the analysed set (each prompt is one item of the
    per-prompt search and of Table 1)."""
    fmt = _Formatter(info, cfg.model.system_prompt) if info else None
    if fmt is not None:
        fmt._token_ids(cfg.model.refusal_tokens)
    budget = info.context - cfg.generation.max_new_tokens if info and info.context else None
    seen: set[str] = set()
    for key in file_keys:
        for spec in files_of(cfg, key):
            if spec in seen:
                continue
            seen.add(spec)
            prompts = load_prompt_set(spec, cfg.data.text_field)
            _repeats(prompts, spec, error=key == "data.harmful_test", log=log)
            if budget is not None and key not in UNFORMATTED:
                assert info is not None and fmt is not None  # a budget comes from the model's info
                for p in prompts:
                    n = len(info.tokenizer(fmt.format_chat(p.text), add_special_tokens=False)["input_ids"])
                    if n > budget:
                        raise UserError(
                            f"{p.source or spec} {_line(p)}: the prompt is {n} tokens with the chat template, "
                            f"over {info.name}'s context of {info.context} less "
                            f"{cfg.generation.max_new_tokens} generated tokens: shorten or remove it"
                        )


def _line(p) -> str:
    return f"line {p.line}" if p.line else f"prompt {p.id}"


def _repeats(prompts, spec: str, error: bool, log) -> None:
    first_text: dict[str, Any] = {}
    first_id: dict[str, Any] = {}
    repeats: list[tuple[Any, Any]] = []
    for p in prompts:
        if p.id in first_id:
            raise UserError(f"{p.source or spec} {_line(p)} has the id {p.id!r} of {_line(first_id[p.id])}: give "
                            "every prompt its own id")
        first_id[p.id] = p
        if p.text in first_text:
            repeats.append((p, first_text[p.text]))
        first_text.setdefault(p.text, p)
    if repeats and error:
        p, q = repeats[0]
        raise UserError(f"{p.source or spec} {_line(p)} repeats the prompt of {_line(q)}: remove repeated prompts "
                        f"({len(repeats)} in all); each prompt is analysed once")
    if repeats:
        log(f"note: {spec} holds {len(repeats)} repeated prompts; they are used as given")


def check_judge(ctx: Context) -> None:
    jc = ctx.cfg.judge
    judge = ctx.judge  # built once here and reused by every stage
    if jc.name == "classifier":
        src = Path(judge.path).expanduser()
        if judge.path.startswith((".", "/", "~")) or src.exists():
            if not (src / "config.json").is_file():
                raise judge._missing("no config.json" if src.is_dir() else "")
        else:
            from transformers import AutoConfig

            try:
                AutoConfig.from_pretrained(judge.path)
            except (OSError, ValueError) as err:
                raise judge._missing((str(err).strip().splitlines() or [""])[0]) from None


def check_backend(ctx: Context) -> None:
    if ctx.cfg.execution.backend != "ray":
        return
    if importlib.util.find_spec("ray") is None:
        raise UserError("--backend ray needs Ray: pip install 'refusalscope[ray]' (or use --backend local)")
    address = ctx.cfg.execution.address
    if address and address != "auto":  # Ray itself retries an absent head for minutes
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise UserError(f"cannot reach Ray at {address} ({getattr(err, 'strerror', None) or err}): check "
                            "--address or start the cluster with `ray start --head`") from None
    ctx.backend  # noqa: B018 - connects now (a wrong address fails here), reused by every stage


def preflight(ctx: Context, stages: list[str]) -> ModelInfo | None:
    """All checks for a run of `stages` (see the module docstring)."""
    resolve_device(ctx.cfg.model.device)
    info = model_info(ctx.cfg)
    check_sae_layers(ctx.cfg, info)
    if any(s not in ("filter", "direction") for s in stages):
        check_saes(ctx.cfg, info)
    check_layers(ctx.cfg, info, stages)
    check_prompts(ctx.cfg, dict.fromkeys(k for s in stages for k in ctx.stages[s].inputs.files), info, ctx.log)
    check_judge(ctx)
    check_backend(ctx)
    from .memory import check_memory

    check_memory(ctx, info, stages)
    if ctx.cfg.analyses.neuronpedia_bundle and {"semantics", "dashboards"} & set(stages):
        from ..methods.np_bundle import bundle_files

        bundle_files(ctx.cfg.analyses.neuronpedia_bundle)  # a one-line error when it is not there
    return info
