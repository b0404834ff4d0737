"""How much memory a run needs, stated before the first stage and checked against the machine.

A run holds the model, the SAEs of the layers a stage reads (every SAE layer, as an upper bound:
Stages 1-3 read up to l*, which the direction stage picks), the judge while it judges, and the
largest batch: a generation batch's KV cache or a forward batch's activations and logits. On CUDA
these count against the GPU's free memory, on the CPU against the available RAM. The estimate is
made from config and header files (no weights read), so a run that cannot fit stops in seconds
with one line instead of failing hours in. `execution.memory_check: false` skips the stop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..io.model import resolve_device, resolve_dtype

PROMPT_TOKENS = 256  # prompt length assumed for batch sizes (chat template included)
GB = 2 ** 30


@dataclass
class MemoryNeed:
    """Bytes per part on `device`, and what that device has free."""

    device: str
    parts: dict[str, float] = field(default_factory=dict)
    available: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def line(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items())
        have = f"; {self.available / GB:.1f} GB available" if self.available is not None else ""
        return f"memory: the run needs about {self.total / GB:.1f} GB on {self.device} ({parts}){have}"


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def param_count(hf_config: Any) -> int:
    """Parameters of a model built from its config on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def sae_widths(cfg, layers: list[int]) -> dict[int, tuple[int, int]] | None:
    """(d_in, d_sae) per SAE layer from the folders' headers (local) or the sae_id's "width_Nk"
    (registry); None when the width cannot be told without downloading."""
    s = cfg.saes
    if s.source == "local" and s.path:
        from ..io.sae_check import read_sae_header

        heads = {l: read_sae_header(s.path.replace("{layer}", str(l))) for l in layers}
        return {l: (h.d_in, h.d_sae) for l, h in heads.items()}
    if s.source == "demo":
        from ..demo.world import sae_dir
        from ..io.sae_check import read_sae_header

        return {l: (h.d_in, h.d_sae) for l in layers for h in [read_sae_header(sae_dir(l))]}
    match = re.search(r"width_(\d+)([km]?)", s.sae_id or "")
    if not match:
        return None
    n = int(match.group(1)) * {"": 1, "k": 1000, "m": 1000 ** 2}[match.group(2)]
    d_sae = n if not match.group(2) else 2 ** round(math.log2(n))  # "65k" is 65,536, "1m" 2^20
    return {l: (0, d_sae) for l in layers}


def available_bytes(device: torch.device) -> float | None:
    """Free GPU memory on CUDA, else MemAvailable from /proc/meminfo (None where neither exists)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return None


def estimate(cfg, info, hf_config: Any, stages: list[str], judge: Any = None) -> MemoryNeed:
    """The memory a run of `stages` needs (see the module docstring)."""
    from .resolve import sae_layers

    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    b = _dtype_bytes(dtype)
    need = MemoryNeed(str(device))
    need.parts["model"] = param_count(hf_config) * b
    if any(s not in ("filter", "direction") for s in stages):
        layers = sae_layers(cfg, info.n_layers, info.name)
        widths = sae_widths(cfg, layers)
        if widths is None:
            need.notes.append("SAE width unknown from saes.sae_id: SAEs not counted")
        else:
            need.parts[f"SAEs ({len(layers)} layers)"] = sum(
                ((d or info.d_model) * m * 2 * b + m * 4 * 2) for d, m in widths.values())
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vocab = text.vocab_size
    g, gen = cfg.generation.batch_size, cfg.generation.max_new_tokens
    kv = g * (PROMPT_TOKENS + gen) * text.num_hidden_layers * 2 * heads * head_dim * b + g * vocab * 4
    fwd = cfg.model.batch_size * PROMPT_TOKENS * (text.hidden_size * 8 * b + vocab * b)
    need.parts["largest batch"] = max(kv, fwd)
    jn = getattr(judge, "path", None)
    if jn is not None and resolve_device(getattr(judge, "device", "auto")) == device:
        from transformers import AutoConfig

        try:
            jc = AutoConfig.from_pretrained(jn)
            jb = _dtype_bytes(resolve_dtype(getattr(judge, "dtype", "auto"), device))
            need.parts["judge"] = param_count(jc) * jb
        except (OSError, ValueError):
            need.notes.append(f"judge {jn}: config not readable, not counted")
    need.available = available_bytes(device)
    return need


def check_memory(ctx, info, stages: list[str]) -> MemoryNeed | None:
    """State the run's memory need in the log and stop (UserError) when the device has less."""
    if info is None or getattr(info, "hf_config", None) is None:
        return None
    need = estimate(ctx.cfg, info, info.hf_config, stages, ctx.judge if ctx.cfg.judge.name in (
        "classifier", "llama-guard") else None)
    ctx.log(need.line() + "".join(f"; {n}" for n in need.notes))
    if ctx.cfg.execution.memory_check and need.available is not None and need.total > need.available:
        biggest = max(need.parts, key=lambda k: need.parts[k])
        raise UserError(
            f"the run needs about {need.total / GB:.1f} GB on {need.device} but {need.available / GB:.1f} GB "
            f"are available (largest part: {biggest}, {need.parts[biggest] / GB:.1f} GB): lower model.batch_size "
            "or generation.batch_size, use fewer saes.layers or a bigger device, or set "
            "execution.memory_check: false")
    return need
