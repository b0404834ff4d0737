"""Read and rewrite the residual stream at `blocks.L.hook_resid_post` of a HuggingFace decoder.

A hook function gets the hidden states of the current chunk of tokens `[B, T, d]` and a `StepInfo`
saying where those tokens sit (padding, prompt vs generated, absolute token index), so the same
function works for a plain forward pass and for every step of cached generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from ..errors import UserError

EMBED = "embed"  # blocks.0.hook_resid_pre: the stream entering the first decoder layer
HookPoint = int | str
HookFn = Callable[[Tensor, "StepInfo"], Tensor | None]


@dataclass
class StepInfo:
    """Where the tokens of the current forward chunk sit in their (left-padded) sequences."""

    attention_mask: Tensor  # [B, S] for everything seen so far (past + this chunk); 1 = real token
    n_new: int  # tokens in this chunk: the last n_new columns of attention_mask
    prompt_len: int | None = None  # padded prompt width; columns >= prompt_len were generated
    row_offset: int = 0  # index of row 0 of this chunk in the caller's full batch

    @cached_property
    def columns(self) -> Tensor:
        total = self.attention_mask.shape[1]
        return torch.arange(total - self.n_new, total, device=self.attention_mask.device)

    @cached_property
    def is_pad(self) -> Tensor:
        return self.attention_mask[:, self.columns] == 0

    @cached_property
    def token_index(self) -> Tensor:
        """Index of each token within its own unpadded sequence (BOS = 0); -1 on padding."""
        idx = self.attention_mask.long().cumsum(1)[:, self.columns] - 1
        return idx.masked_fill(self.is_pad, -1)

    @cached_property
    def is_prompt(self) -> Tensor:
        if self.prompt_len is None:
            return ~self.is_pad
        return (self.columns < self.prompt_len).unsqueeze(0) & ~self.is_pad

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]


def _hidden(output):
    """Decoder layers return a Tensor in transformers 5 and a tuple in older releases."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, new: Tensor):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


class StreamHooks:
    """Owns the hook handles on one model: a step tracker plus user hooks installed for a block."""

    def __init__(self, decoder: nn.Module, layers: nn.ModuleList, auto_prompt: bool = False):
        """`auto_prompt`: take the prompt width from each pass without a KV cache, so that a caller
        who does not say where the prompt ends (a plain `model.generate`) still gets prompt vs
        generated positions right for cached generation."""
        self.layers = layers
        self.step: StepInfo | None = None
        self.prompt_len: int | None = None
        self.row_offset: int = 0
        self.auto_prompt = auto_prompt
        self._tracker = decoder.register_forward_pre_hook(self._track, with_kwargs=True)

    def close(self) -> None:
        """Remove the step tracker (for hooks installed on a model the caller keeps using)."""
        self._tracker.remove()

    def _track(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        n_new = ref.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:  # no padding: every past and new token is real
            past = kwargs.get("past_key_values")
            n_past = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else 0
            mask = torch.ones(ref.shape[0], n_past + n_new, dtype=torch.long, device=ref.device)
        if self.auto_prompt and mask.shape[1] == n_new:  # no past tokens: this pass is a prompt
            self.prompt_len = n_new
        self.step = StepInfo(mask, n_new, self.prompt_len, self.row_offset)
        return None

    def _check_point(self, point: HookPoint) -> None:
        if point == EMBED:
            return
        if not isinstance(point, int) or not 0 <= point < len(self.layers):
            raise UserError(
                f"unknown hook layer {point!r}: the model has layers 0..{len(self.layers) - 1}"
            )

    @contextmanager
    def installed(self, hooks: dict[HookPoint, list[HookFn]]) -> Iterator[None]:
        """Install hook functions for the duration of a `with` block (several per point allowed)."""
        handles = []
        try:
            for point, fns in hooks.items():
                self._check_point(point)
                fns = list(fns)
                if point == EMBED:
                    handles.append(
                        self.layers[0].register_forward_pre_hook(self._pre(fns), with_kwargs=True)
                    )
                else:
                    assert isinstance(point, int)  # _check_point allows only EMBED or a layer index
                    handles.append(self.layers[point].register_forward_hook(self._post(fns)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _apply(self, fns: list[HookFn], h: Tensor) -> Tensor:
        step = self.step
        assert step is not None  # set by the decoder's pre-hook, which runs before any layer
        for fn in fns:
            out = fn(h, step)
            if out is not None:
                h = out
        return h

    def _pre(self, fns):
        def hook(module, args, kwargs):
            if args:
                return (self._apply(fns, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._apply(fns, kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _post(self, fns):
        def hook(module, args, output):
            return _replace_hidden(output, self._apply(fns, _hidden(output)))

        return hook
