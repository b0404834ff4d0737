"""The offline corpus the demo SAEs are trained on, and residual activations collected from it.

Text mix: chat-formatted training conversations (prompt + the reply the model was tuned to give),
chat-formatted val/test prompts, bundled general-domain passages, and continuations the model
writes from varied openings. Padding and position 0 (BOS, an attention sink whose norm dwarfs
the rest) are left out, as in Gemma Scope's training.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..io.model import ChatModel, Generation


def generate_by_length(model: ChatModel, texts: Sequence[str], chat: bool, max_new_tokens: int,
                       batch_size: int, quiet: bool = True, desc: str = "generate") -> Generation:
    """Greedy generation with rows sorted by length, so that each batch carries little padding
    (about a quarter faster on the build's prompt sets); results come back in the given order.
    `chat`: `texts` are instructions to chat-format, else already formatted text. Only for
    generation without per-row interventions (rows are reordered)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows = [texts[i] for i in order]
    batch = model.encode(rows) if chat else model.encode_texts(rows)
    g = model.generate_full(batch, max_new_tokens=max_new_tokens, batch_size=batch_size, quiet=quiet, desc=desc)
    back = sorted(range(len(order)), key=order.__getitem__)
    return Generation([g.texts[j] for j in back], [g.ended[j] for j in back], g.p_refusal[back])


def continuations(model: ChatModel, openings: Sequence[str], max_new_tokens: int, batch_size: int,
                  quiet: bool = False) -> list[str]:
    """Raw-text continuations (no chat template) of each opening, greedy."""
    bos = model.tokenizer.bos_token or ""
    outs = generate_by_length(model, [bos + o for o in openings], False, max_new_tokens, batch_size,
                              quiet, "corpus continuations").texts
    return [o + " " + c for o, c in zip(openings, outs)]


def corpus_texts(model: ChatModel, conversations: Sequence[tuple[str, str]], prompts: Sequence[str],
                 passages: Sequence[str], continued: Sequence[str]) -> list[str]:
    bos = model.tokenizer.bos_token or ""
    texts = [p + r for p, r in conversations]
    texts += [model.format_chat(p) for p in prompts]
    texts += [bos + t for t in list(passages) + list(continued)]
    return texts


@torch.no_grad()
def collect(model: ChatModel, texts: Sequence[str], layers: Sequence[int], max_tokens: int, seed: int,
            batch_size: int = 16, max_length: int = 256, quiet: bool = False,
            hooks: Callable[[int], dict] | None = None, desc: str = "collect activations") -> dict[int, Tensor]:
    """Residual activations [N, d] (fp16) at every layer for up to max_tokens real tokens of a
    seeded random sample of `texts` (one forward pass serves all layers). `hooks(i)` gives the
    residual hooks (ChatModel.hooks) that batch i runs under, e.g. an ablation."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    lengths = [min(len(model.tokenizer(texts[i], add_special_tokens=False)["input_ids"]), max_length)
               for i in order]
    chosen, total = [], 0
    for i, n in zip(order, lengths):
        if total >= max_tokens:
            break
        chosen.append(i)
        total += n - 1
    chosen.sort(key=lambda i: len(texts[i]))  # similar lengths together: little padding
    bufs = {layer: torch.empty(total, model.d_model, dtype=torch.float16) for layer in layers}
    filled = 0
    bar = tqdm(total=total, desc=desc, unit="tok", disable=quiet, leave=False)
    for start in range(0, len(chosen), batch_size):
        batch = model.encode_texts([texts[i] for i in chosen[start:start + batch_size]],
                                   max_length=max_length)
        with model.hooks(hooks(start // batch_size) if hooks else None):
            res = model.residuals(batch, list(layers))
        keep = batch.attention_mask.bool().clone()
        keep[torch.arange(len(batch)), (batch.attention_mask == 0).sum(1)] = False  # BOS
        n = int(keep.sum())
        for layer in layers:
            bufs[layer][filled:filled + n] = res[layer][keep].half()
        filled += n
        bar.update(n)
    bar.close()
    return {layer: b[:filled] for layer, b in bufs.items()}
