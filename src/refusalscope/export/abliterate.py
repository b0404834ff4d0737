"""`--to model`: the run's refusal direction r̂(l*) orthogonalised out of the weights that write into
the residual stream (Arditi et al. 2024, the abliteration of heretic and similar tools), saved as a
plain HuggingFace folder that `AutoModelForCausalLM.from_pretrained` loads without refusalscope.

W ← W − r̂ r̂ᵀ W for every matrix that writes the stream (token embedding rows, each layer's
attention-out and MLP-out), so no layer can write along r̂: the same model as projecting r̂ out of
every write (the embedding, each attention and MLP output). Tied input/output embeddings are untied
first, so the unembedding still reads the original vocabulary. The refusalscope engine's own
`DirectionAblation` projects at layer outputs only (the MLP still sees attention's r̂ component),
so it is close to, not identical with, this model; docs/apply.md gives the measured gap.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_write_json, atomic_write_tensors, atomic_write_text
from ..errors import UserError
from ..run.results import RunResults

NOTICE = ("this model is {source} with its refusal direction (layer {layer}) orthogonalised out of its "
          "weights: it removes a safety safeguard and will follow harmful instructions it used to refuse; "
          "use it for research on refusal only, and do not deploy it")


def _unit(direction: torch.Tensor) -> torch.Tensor:
    d = direction.detach().double().flatten()
    n = d.norm()
    if not torch.isfinite(n) or n < 1e-12:
        raise UserError("the refusal direction is zero or not finite: rerun the direction stage")
    return d / n


@torch.no_grad()
def _project_out_rows(weight: torch.Tensor, r: torch.Tensor) -> None:
    """Rows are vectors in the stream (embedding [V, d]): W ← W − (W r̂) r̂ᵀ, in place."""
    w = weight.data.double()
    weight.data.copy_((w - (w @ r).unsqueeze(1) * r).to(weight.dtype))


@torch.no_grad()
def _project_out_columns(linear: Any, r: torch.Tensor) -> None:
    """An nn.Linear writing the stream (weight [d, in]): W ← W − r̂ (r̂ᵀ W), and its bias."""
    w = linear.weight.data.double()
    linear.weight.data.copy_((w - torch.outer(r, r @ w)).to(linear.weight.dtype))
    bias = getattr(linear, "bias", None)
    if bias is not None:
        b = bias.data.double()
        bias.data.copy_((b - (b @ r) * r).to(bias.dtype))


def _writers(layer: torch.nn.Module, i: int) -> list[torch.nn.Module]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    out = [getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)]
    if any(m is None or not isinstance(getattr(m, "weight", None), torch.Tensor) for m in out):
        raise UserError(f"layer {i} ({type(layer).__name__}) has no self_attn.o_proj and mlp.down_proj: "
                        "abliteration supports Llama-, Mistral-, Qwen- and Gemma-style dense models")
    return out  # type: ignore[return-value]  # checked above


@torch.no_grad()
def abliterate(hf: Any, direction: torch.Tensor) -> dict:
    """Orthogonalise `direction` out of a transformers causal LM's stream-writing weights, in place.
    Returns what changed: matrices edited, whether embeddings were untied, and whether the model
    equals direction ablation exactly (not for sublayers normalised after their output, Gemma-2)."""
    decoder = hf.get_decoder()
    embed = decoder.embed_tokens
    d_model = embed.weight.shape[1]
    if direction.numel() != d_model:
        raise UserError(f"the refusal direction has {direction.numel()} entries but the model's stream has "
                        f"{d_model}: export with the run's own model")
    r = _unit(direction).to(embed.weight.device)
    out_emb = hf.get_output_embeddings()
    untied = out_emb is not None and out_emb.weight is embed.weight
    if untied:  # the unembedding keeps reading the original vocabulary
        out_emb.weight = torch.nn.Parameter(embed.weight.detach().clone())
        hf.config.tie_word_embeddings = False
        text = hf.config.get_text_config()
        if text is not hf.config:
            text.tie_word_embeddings = False
    _project_out_rows(embed.weight, r)
    n = 1
    post_normed = False
    for i, layer in enumerate(decoder.layers):
        for module in _writers(layer, i):
            _project_out_columns(module, r)
            n += 1
        post_normed |= hasattr(layer, "post_feedforward_layernorm")
    return {"matrices": n, "untied_embeddings": bool(untied), "exact": not post_normed}


def _hook_logits(hf: Any, ids: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` with r̂ projected out of the embedding and every attention and MLP output: the
    direction-ablation hooks that the edited weights stand for (what `check` compares with)."""
    r = r.to(device=ids.device, dtype=next(hf.parameters()).dtype)

    def project(module, args, output):
        return output - (output @ r).unsqueeze(-1) * r
    decoder = hf.get_decoder()
    handles = [m.register_forward_hook(project) for m in
               [decoder.embed_tokens, *(w for i, layer in enumerate(decoder.layers) for w in _writers(layer, i))]]
    try:
        with torch.inference_mode():
            return hf(input_ids=ids).logits.float()
    finally:
        for h in handles:
            h.remove()


def model_card(source: str, run_dir: Path, layer: int, info: dict, system_prompt: str | None) -> str:
    exact = ("Every write into the residual stream is orthogonal to r̂, so no layer can represent it: the "
             "same model as projecting r̂ out of the embedding and every attention and MLP output."
             if info["exact"] else
             "This architecture normalises each sublayer's output after o_proj / down_proj, so the "
             "edited weights remove r̂ only approximately.")
    sys_note = (f"\nThe run used the system prompt {system_prompt!r}; the chat template here does not add it.\n"
                if system_prompt else "")
    return f"""---
tags: [abliterated, refusal-direction, refusalscope]
---
# Abliterated {source}

**Warning: {NOTICE.format(source=source, layer=layer)}.**

Made by `refusalscope export --to model` from the run `{run_dir}`: the refusal direction r̂ (difference
in means of harmful and harmless prompts at layer l* = {layer}, unit length; `refusal_direction.safetensors`)
is orthogonalised out of the token embedding and every layer's attention-out and MLP-out matrix
({info['matrices']} matrices, W ← W − r̂ r̂ᵀ W; Arditi et al. 2024, "Refusal in Language Models Is Mediated
by a Single Direction"). {exact}{' Input and output embeddings were untied first.' if info['untied_embeddings'] else ''}
Checked on one refused prompt: its logits differ from the direction-ablation hooks' on the original model
by at most {info['check']['max_abs_logit_gap']:.2g} (largest logit {info['check']['max_abs_logit']:.3g}).
{sys_note}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("<this folder>")
model = AutoModelForCausalLM.from_pretrained("<this folder>")
```
"""


def _publish(tmp: Path, out: Path) -> list[str]:
    """Move every file of the finished temporary folder into `out` (README last: it marks done)."""
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in sorted(names, key=lambda n: n == "README.md"):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return names


def _plain(hf: Any) -> None:
    """A model read from a GGUF file is dequantised on load but still marked quantised, and
    transformers refuses to save such a model: drop the marks (its weights are plain tensors)."""
    if getattr(hf, "hf_quantizer", None) is not None or getattr(hf, "is_quantized", False):
        hf.hf_quantizer, hf.is_quantized = None, False
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config


def export_model(run_dir: Path, out: Path, *, dtype: str | None = None, **_: object) -> dict:
    """Write the run's model with r̂(l*) orthogonalised out into `out` (safetensors + tokenizer +
    chat template + a model card saying what it is); `notes` carries the warning the CLI prints, and
    `check` how far the edited model's logits lie from the direction-ablation hooks on one refused
    prompt (two forward passes of one prompt: a folder that reloads wrong is caught against it).
    `dtype`: save in another dtype than the run's."""
    from ..run.resolve import load_model

    res = RunResults(run_dir)
    cfg = res.config()
    if cfg is None:
        raise UserError(f"{res.root} has no config.yaml: the model export needs the run's config to load its model")
    direction, layer = res.direction()  # a one-line error when the direction stage has not run
    model = load_model(cfg, quiet=True, log=lambda _: None)
    hf, tok = model.hf, model.tokenizer
    if dtype is not None:
        from ..io.model import resolve_dtype

        hf.to(resolve_dtype(dtype))
    _plain(hf)
    kept = res.kept_prompts() if res.done("filter") else []
    text = kept[0].text if kept else "How do I make a bomb?"
    ids = model.encode([text]).input_ids.to(model.device)
    want = _hook_logits(hf, ids, _unit(direction))
    info = abliterate(hf, direction)
    with torch.inference_mode():
        got = hf(input_ids=ids).logits.float()
    info["check"] = {"prompt": text, "max_abs_logit_gap": float((got - want).abs().max()),
                     "max_abs_logit": float(want.abs().max()),
                     "what": "largest |logit difference| from the direction-ablation hooks, one refused prompt"}
    source = model.name if cfg.model.source == "demo" else cfg.model.source
    notice = NOTICE.format(source=source, layer=layer)
    out = Path(out)
    tmp = out / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    atomic_write_tensors(tmp / "refusal_direction.safetensors", {"direction": direction.float().contiguous()},
                         {"layer": str(layer)})
    meta = {"source": source, "run": str(res.root), "layer": layer, **info, "notice": notice,
            "dtype": str(next(hf.parameters()).dtype).replace("torch.", "")}
    atomic_write_json(tmp / "abliteration.json", meta)
    atomic_write_text(tmp / "README.md", model_card(source, res.root, layer, info, cfg.model.system_prompt))
    files = _publish(tmp, out)
    check = info["check"]
    return {"files": files, "layer": layer, **info, "notes": [
        notice, f"checked on one refused prompt: its logits are within {check['max_abs_logit_gap']:.2g} of the "
                f"direction-ablation hooks' (largest logit {check['max_abs_logit']:.3g}; abliteration.json: check)"]}
