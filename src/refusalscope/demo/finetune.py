"""Safety fine-tuning that gives the demo model a refusal behaviour to dissect.

Harmful requests are paired with varied refusals that start with "I"; harmless ones, including
contrast prompts phrased like harmful requests, with the base model's own greedy replies, so the
model learns to refuse harm rather than phrasing and stays as helpful as it was. The loss covers
reply tokens only, and the unembedding is applied only at those positions (the costly part of a
small model's forward pass).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..artifacts import atomic_write_json, atomic_write_tensors, read_json
from ..io.model import ChatModel
from .recipe import FinetuneRecipe
from .refat import ablating, draw, refusal_directions


def build_examples(model: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                   harmless_replies: Sequence[str], refusals: Sequence[str], seed: int,
                   harmless_weights: Sequence[float] | None = None):
    """(prompt text, reply text, loss weight, harmful?) tuples; each harmful prompt gets a refusal
    drawn with `seed`. `harmless_weights` lets contrast prompts (benign, phrased like harmful
    ones) count more: they carry the distinction the model must learn."""
    rng = random.Random(seed)
    eos = model.tokenizer.eos_token
    weights = list(harmless_weights) if harmless_weights is not None else [1.0] * len(harmless)
    examples = [(model.format_chat(p), rng.choice(list(refusals)) + eos, 1.0, True) for p in harmful]
    for p, reply, w in zip(harmless, harmless_replies, weights):
        examples.append((model.format_chat(p), reply, float(w), False))
    rng.shuffle(examples)
    return examples


def _tokenize(model: ChatModel, examples):
    """(ids, prompt length, weight, harmful?) per example; examples are
    (prompt, reply[, weight[, harmful?]]) (by default weight 1, harmful)."""
    tok = model.tokenizer
    out = []
    for prompt, reply, *rest in examples:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(reply, add_special_tokens=False)["input_ids"]
        weight = float(rest[0]) if rest else 1.0
        harmful = bool(rest[1]) if len(rest) > 1 else True
        out.append((p + r, len(p), weight, harmful))
    return out


def _batches(items, batch_size: int, seed: int):
    """Length-bucketed batches (little padding) in a seeded random order."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def _collate(items, idx, pad_id: int,
             decision_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(items[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    target = torch.full((len(idx), width), -100, dtype=torch.long)
    weight = torch.zeros((len(idx), width))
    avoid = torch.zeros((len(idx), width), dtype=torch.bool)  # harmless decision positions
    for row, i in enumerate(idx):
        seq, n_prompt, w, harmful = items[i]
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        target[row, n_prompt - 1:len(seq) - 1] = torch.tensor(seq[n_prompt:])  # next-token targets
        weight[row, n_prompt - 1:len(seq) - 1] = w
        weight[row, n_prompt - 1] = w * decision_weight  # the first reply token: refuse or answer
        avoid[row, n_prompt - 1] = not harmful
    return ids, mask, target, weight, avoid


@contextmanager
def _layers(decoder, keep: slice):
    """Temporarily run the decoder with only `decoder.layers[keep]`."""
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(full)[keep])
    try:
        yield
    finally:
        decoder.layers = full


class FrozenPrefix:
    """Layers below `n` do not change during the fine-tune, so each example's stream after them
    is computed once and every step runs only the trained layers from there (exact: training
    batches are right-padded, so real tokens never see padding). Llama-only: Gemma-style models
    rescale `inputs_embeds` inside their forward."""

    def __init__(self, hf, items, n: int, batch_size: int = 16, quiet: bool = True):
        self.n = n
        self.cache: list[torch.Tensor | None] = [None] * len(items)
        dec = hf.get_decoder()
        grab: dict[str, torch.Tensor] = {}
        handle = dec.layers[n - 1].register_forward_hook(
            lambda m, a, o: grab.update(h=o[0] if isinstance(o, tuple) else o)
        )
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        try:
            with torch.no_grad(), _layers(dec, slice(0, n)):
                for start in tqdm(range(0, len(order), batch_size), desc=f"cache frozen layers 0-{n - 1}",
                                  disable=quiet, leave=False):
                    idx = order[start:start + batch_size]
                    width = max(len(items[i][0]) for i in idx)
                    ids = torch.zeros(len(idx), width, dtype=torch.long)
                    for row, i in enumerate(idx):  # right padding: real tokens never attend to it
                        ids[row, :len(items[i][0])] = torch.tensor(items[i][0])
                    dec(input_ids=ids, use_cache=False)
                    for row, i in enumerate(idx):
                        self.cache[i] = grab["h"][row, :len(items[i][0])].clone()
        finally:
            handle.remove()

    @staticmethod
    def usable(hf, n: int) -> bool:
        return n > 0 and hf.config.model_type == "llama"

    def inputs(self, idx, width: int) -> torch.Tensor:
        first = self.cache[0]
        assert first is not None  # __init__ fills every entry
        out = torch.zeros(len(idx), width, first.shape[-1], dtype=first.dtype)
        for row, i in enumerate(idx):
            out[row, :len(self.cache[i])] = self.cache[i]
        return out


def _reply_loss(hf, ids, mask, target, weight, avoid=None, prefix: FrozenPrefix | None = None,
                idx=None, refusal_ids: Sequence[int] = (), unlikelihood: float = 0.0):
    """Weighted reply-token cross-entropy, plus `unlikelihood` x -log(1 - P(refusal tokens)) at
    the decision token of harmless examples. Cross-entropy only raises the base reply's first
    token; the extra term pushes the refusal token itself down, hardest where it is most likely
    (benign prompts that look harmful), without touching harmful examples."""
    dec = hf.get_decoder()
    if prefix is None:
        hidden = dec(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    else:
        with _layers(dec, slice(prefix.n, None)):
            hidden = dec(inputs_embeds=prefix.inputs(idx, ids.shape[1]), attention_mask=mask,
                         use_cache=False).last_hidden_state
    sel = target != -100
    logits = hf.lm_head(hidden[sel])
    ce = torch.nn.functional.cross_entropy(logits.float(), target[sel], reduction="none")
    w = weight[sel]
    loss = (ce * w).sum() / w.sum()
    if unlikelihood and refusal_ids and avoid is not None and avoid.any():
        at = avoid[sel]
        p_refuse = logits[at].float().softmax(-1)[:, list(refusal_ids)].sum(-1)
        ul = -torch.log1p(-p_refuse.clamp(max=1 - 1e-6))
        loss = loss + unlikelihood * (ul * w[at]).sum() / w.sum()
    return loss


def finetune(model: ChatModel, examples, recipe: FinetuneRecipe, seed: int, workdir: Path,
             quiet: bool = False) -> dict:
    """Full fine-tune in place; checkpoints model + optimizer after each epoch and resumes."""
    hf = model.hf
    items = _tokenize(model, examples)
    params = [(n, p) for n, p in hf.named_parameters()
              if not (recipe.freeze_embeddings and "embed" in n)
              and not _below(n, recipe.freeze_layers_below)]
    for _n, p in hf.named_parameters():
        p.requires_grad_(any(p is q for _, q in params))
    opt = torch.optim.AdamW([p for _, p in params], lr=recipe.lr, weight_decay=0.0, fused=True)
    steps_per_epoch = math.ceil(len(items) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / recipe.warmup_steps) * max(0.0, 1 - s / total))
    state_path, ckpt = workdir / "finetune_state.json", workdir / "finetune_ckpt.safetensors"
    start_epoch, history = 0, []
    if state_path.exists() and ckpt.exists():
        state = read_json(state_path)
        start_epoch, history = state["epochs_done"], state["history"]
        _load_state(hf, opt, sched, load_file(str(ckpt)), params, start_epoch * steps_per_epoch)
    prefix = FrozenPrefix(hf, items, recipe.freeze_layers_below, quiet=quiet) \
        if FrozenPrefix.usable(hf, recipe.freeze_layers_below) and start_epoch < recipe.epochs else None
    hf.train()
    pad = model.tokenizer.pad_token_id
    torch.manual_seed(seed)
    trained = list(range(max(recipe.freeze_layers_below, 0), hf.config.num_hidden_layers))
    for epoch in range(start_epoch, recipe.epochs):
        losses = []
        refat = recipe.refat_prob > 0 and epoch >= recipe.refat_from_epoch
        directions = refusal_directions(hf, items, trained) if refat else {}
        rng = random.Random(f"{seed}/refat/{epoch}")
        bar = tqdm(_batches(items, recipe.batch_size, seed + epoch), disable=quiet,
                   desc=f"fine-tune epoch {epoch + 1}/{recipe.epochs}" + (" (ReFAT)" if directions else ""))
        for idx in bar:
            rows, layers = draw(rng, [items[i][3] for i in idx], trained, recipe.refat_prob,
                                recipe.refat_layer_prob) if directions else ([], [])
            with ablating(hf, directions, layers, rows):
                loss = _reply_loss(hf, *_collate(items, idx, pad, recipe.decision_weight), prefix, idx,
                                   model.refusal_token_ids, recipe.refusal_unlikelihood)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        history.append({"epoch": epoch + 1, "mean_loss": sum(losses) / len(losses)})
        atomic_write_tensors(ckpt, _state_tensors(hf, opt, params))
        atomic_write_json(state_path, {"epochs_done": epoch + 1, "history": history})
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return {"examples": len(items), "steps": total, "history": history}


def _below(name: str, first_trained: int) -> bool:
    """True for parameters of decoder layers with index < first_trained."""
    parts = name.split(".")
    if "layers" not in parts:
        return False
    return int(parts[parts.index("layers") + 1]) < first_trained


def _state_tensors(hf, opt, params) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for n, p in hf.state_dict().items():  # tied embeddings share storage: save them once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[f"model.{n}"] = p.detach()
    for n, p in params:
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                out[f"opt.{key}.{n}"] = st[key]
    return out


def _load_state(hf, opt, sched, tensors, params, step: int) -> None:
    hf.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    for n, p in params:
        if f"opt.exp_avg.{n}" in tensors:
            opt.state[p] = {"step": torch.tensor(float(step)),
                            "exp_avg": tensors[f"opt.exp_avg.{n}"].clone(),
                            "exp_avg_sq": tensors[f"opt.exp_avg_sq.{n}"].clone()}
    for _ in range(step):
        sched.step()
