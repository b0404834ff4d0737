"""Reading exports back with the tools they are for, shared by the tiny-world export tests and the
demo-run tests (test_export_demo.py): TransformerLens / SAELens for the bundle, lm-eval's offline
HuggingFace cache, Arditi et al.'s direction-ablation hooks for the abliterated model, and the
Neuronpedia JSON schemas (tests/schemas, written from Neuronpedia's source)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
REPO, REV = "refusalscope-tests/tiny-saes", "0" * 40


def schema(name: str) -> dict:
    """Neuronpedia's body schema `name` (list, quick_list, vector)."""
    return json.loads((SCHEMAS / f"neuronpedia_{name}.json").read_text())


def hooked_llama(hf, dtype: torch.dtype = torch.float32, n_ctx: int = 2048):
    """A transformers Llama as a SAELens HookedSAETransformer (TransformerLens weights converted,
    nothing folded), in `dtype`. `n_ctx` caps the context: TransformerLens keeps an n_ctx² mask per
    layer (SmolLM2's 8192 would be 2 GB)."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, n_layers=c.num_hidden_layers,
        d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=min(n_ctx, c.max_position_embeddings), act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=d_head, gated_mlp=True,
        n_key_value_heads=c.num_key_value_heads, eps=c.rms_norm_eps, final_rms=True,
        rotary_base=(getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0),
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, dtype=dtype)
    tl = HookedSAETransformer(cfg)
    tl.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    return tl.to(dtype).eval()


def last_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities at the last position."""
    return torch.softmax(logits[:, -1].double(), dim=-1)


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative difference of `a` from `b`, entry by entry."""
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def saelens_splice(tl, saes: Mapping[int, object], by_layer: Mapping[int, list[int]], ids: torch.Tensor
                   ) -> torch.Tensor:
    """SAELens's own way to ablate latents, independent of any export: each layer's SAE (`saes`, SAELens
    objects) spliced into HookedSAETransformer `tl` with the error term kept and the latents `by_layer`
    zeroed at hook_sae_acts_post, at every position. Returns the next-token probabilities of `ids`."""
    def zero(idx):
        def fn(acts, hook):
            acts[..., idx] = 0.0
            return acts
        return fn
    hooks = []
    for layer, idx in by_layer.items():
        sae = saes[layer]
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"  # type: ignore[attr-defined]
        tl.add_sae(sae, use_error_term=True)
        hooks.append((f"blocks.{layer}.hook_resid_post.hook_sae_acts_post", zero(idx)))
    try:
        with torch.no_grad():
            return last_probs(tl.run_with_hooks(ids, fwd_hooks=hooks))
    finally:
        tl.reset_saes()


def ablation_hooks(hf, r: torch.Tensor) -> list:
    """Arditi et al.'s direction ablation as hooks: r̂ projected out of the embedding output and of
    every attention-out and MLP-out (refusal_direction's get_all_direction_ablation_hooks). Returns
    the handles; remove them when done."""
    dtype = next(hf.parameters()).dtype
    r = (r / r.norm()).to(dtype)

    def project(module, args, output):
        return output - (output @ r).unsqueeze(-1) * r
    dec = hf.get_decoder()
    mods = [dec.embed_tokens] + [m for layer in dec.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    return [m.register_forward_hook(project) for m in mods]


def forward_logits(hf, batch) -> torch.Tensor:
    """All-position logits of a left-padded PromptBatch through a plain transformers model."""
    mask = batch.attention_mask
    with torch.inference_mode():
        return hf(input_ids=batch.input_ids, attention_mask=mask,
                  position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits


def hooked_logits(hf, batch, r: torch.Tensor) -> torch.Tensor:
    """forward_logits with Arditi's ablation hooks of `r` installed for the pass."""
    handles = ablation_hooks(hf, r)
    try:
        return forward_logits(hf, batch)
    finally:
        for h in handles:
            h.remove()


def check_gap(abl, hf, ids: torch.Tensor, r: torch.Tensor) -> float:
    """Largest |logit difference| of model `abl` from `hf` under Arditi's hooks of `r` on the token ids
    of one prompt, each called as `model(input_ids=ids)` (the form of the model export's own check)."""
    handles = ablation_hooks(hf, r)
    try:
        with torch.inference_mode():
            return float((abl(input_ids=ids).logits.float() - hf(input_ids=ids).logits.float()).abs().max())
    finally:
        for h in handles:
            h.remove()


def as_release(run: Path, tmp: Path, folders: Mapping[int, str | os.PathLike],
               neuronpedia_id: str | None = None) -> tuple[Path, Path]:
    """A view of run `run` as if its SAEs were the hub repo REPO (folder layer_L each), and that repo in
    a HuggingFace cache under `tmp` (what `SAE.from_pretrained(REPO, "layer_L")` reads offline, e.g.
    inside lm-eval). `folders`: {layer: SAELens folder}. The view links every file of the run but
    config.yaml, so a big run is not copied. Returns (view, hub cache folder)."""
    view = tmp / "run"
    view.mkdir(parents=True)
    for entry in Path(run).iterdir():
        if entry.name not in ("config.yaml", "run.lock"):
            (view / entry.name).symlink_to(entry.resolve())
    cfg = yaml.safe_load((Path(run) / "config.yaml").read_text())
    cfg["saes"].update(source="release", release=REPO, sae_id="layer_{layer}", path=None,
                       neuronpedia_id=neuronpedia_id)
    (view / "config.yaml").write_text(yaml.safe_dump(cfg))
    repo = tmp / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    (repo / "snapshots" / REV).mkdir(parents=True)
    for layer, folder in folders.items():
        name = f"layer_{layer}"
        (repo / "snapshots" / REV / name).symlink_to(Path(folder).resolve())
        if not (Path(folder) / "sparsity.safetensors").exists():  # known absent: no download attempt
            (repo / ".no_exist" / REV / name).mkdir(parents=True)
            (repo / ".no_exist" / REV / name / "sparsity.safetensors").touch()
    return view, tmp / "hub"


def sae_folders(run: Path, layers) -> dict[int, Path]:
    """{layer: the run's SAELens folder of that layer} (local or demo SAEs)."""
    from refusalscope.export.selection import sae_source
    from refusalscope.run.results import RunResults

    src = sae_source(RunResults(run))
    return {l: Path(src.layer(l)["path"]) for l in layers}


def lm_eval_clamp_by_hand(hf, ids: torch.Tensor, layer: int, sae_folder: Path, index: int) -> torch.Tensor:
    """What lm-eval's steered model does for a `clamp, coefficient 0` row, written from its rule:
    (h − b_dec) loses its component along the unit decoder row, at every position of layer `layer`'s
    output. Returns the logits of `ids`."""
    from safetensors.torch import load_file

    sae = load_file(str(Path(sae_folder) / "sae_weights.safetensors"))
    dtype = next(hf.parameters()).dtype
    d = (sae["W_dec"][index] / sae["W_dec"][index].norm()).to(dtype)
    b = sae["b_dec"].to(dtype)

    def by_hand(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h - ((h - b) @ d).unsqueeze(-1) * d
        return (h, *output[1:]) if isinstance(output, tuple) else h
    handle = hf.model.layers[layer].register_forward_hook(by_hand)
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        handle.remove()
