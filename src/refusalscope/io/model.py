"""A HuggingFace causal chat model with chat formatting, left-padded batching and residual hooks.

Everything above this layer talks to models only through `ChatModel`, so Llama-family, Gemma-2 and
the GGUF demo model look the same: `encode` prompts, `logits` / `residuals` / `generate` in batches,
and `hooks` to read or rewrite `blocks.L.hook_resid_post` while doing so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import UserError
from .compiled import CompiledLayers
from .hooks import EMBED, HookFn, HookPoint, StreamHooks
from .oom import halve_on_oom


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for `model.device`, checked against what this machine has (a missing GPU
    is one line here, not a CUDA traceback at the first tensor moved)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            have = f"GPUs cuda:0..cuda:{n - 1}" if n else "no CUDA GPU"
            raise UserError(f"model.device is {device!r} but this machine has {have}: use auto, cpu"
                            f"{' or one of those' if n else ''}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"model.device is {device!r} but this machine has no MPS (Apple GPU): use auto or cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


@dataclass
class PromptBatch:
    """Chat-formatted prompts, tokenized and left-padded to one width."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    n_post: list[int]  # template tokens after the user text ("post-instruction" positions)
    texts: list[str]  # the formatted chat strings

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> PromptBatch:
        """Rows start:stop, with padding columns that became all-pad trimmed away."""
        ids, mask = self.input_ids[start:stop], self.attention_mask[start:stop]
        keep = int(mask.sum(1).max().item()) if len(ids) else 0
        return PromptBatch(ids[:, -keep:], mask[:, -keep:], self.n_post[start:stop],
                           self.texts[start:stop])

    def select(self, index: Sequence[int]) -> PromptBatch:
        """The rows at `index` (repeats allowed), e.g. one prompt once per candidate ablation."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        sub = PromptBatch(self.input_ids[idx], self.attention_mask[idx],
                          [self.n_post[i] for i in idx.tolist()], [self.texts[i] for i in idx.tolist()])
        return sub.rows(0, len(sub))

    @property
    def lengths(self) -> Tensor:
        return self.attention_mask.sum(1)


class ChatModel:
    """Wraps a transformers causal LM and its tokenizer (see module docstring)."""

    log: Callable[[str], None]  # optional: set by the caller; io/oom.py reports retries through it

    def __init__(self, hf_model, tokenizer, name: str = "model", system_prompt: str | None = None,
                 refusal_tokens: Sequence[str] = ("I",)):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.system_prompt = system_prompt
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"model {name!r} has no chat template: use an instruction-tuned model or set "
                "model.chat_template in the config (refusalscope needs chat-formatted prompts)"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        decoder = hf_model.get_decoder()
        self.layers = decoder.layers
        self._hooks = StreamHooks(decoder, self.layers)
        self.refusal_token_ids = self._token_ids(refusal_tokens)
        self._compiled: CompiledLayers | None = None

    def compile(self, mode: str | None = None) -> ChatModel:
        """Compile each decoder layer for forward passes (`io.compiled`): on a GPU the passes stop
        waiting on the host; the first pass of each layer kind compiles (seconds to a minute)."""
        if self._compiled is None:
            self._compiled = CompiledLayers(self.layers, mode=mode)
        return self

    @property
    def compile_seconds(self) -> float:
        """Wall time spent in passes that compiled a graph (0 when not compiled)."""
        return self._compiled.compile_seconds if self._compiled is not None else 0.0

    # ----------------------------------------------------------------- properties
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.hf.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def _token_ids(self, tokens: Sequence[str]) -> list[int]:
        ids = []
        for t in tokens:
            enc = self.tokenizer.encode(t, add_special_tokens=False)
            if len(enc) != 1:
                raise UserError(f"refusal token {t!r} is {len(enc)} tokens for {self.name}: "
                                "pick a string the tokenizer encodes as one token")
            ids.append(enc[0])
        return ids

    # ----------------------------------------------------------------- formatting
    def format_chat(self, instruction: str, reply: str | None = None, system: str | None = None) -> str:
        """The chat string for one user turn, ending at the assistant header (or after `reply`)."""
        system = self.system_prompt if system is None else system
        messages = [{"role": "user", "content": instruction}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        try:
            text = self._apply_template(messages)
        except Exception as err:  # templates without a system role (Gemma) raise here
            if not system or "system" not in str(err).lower():
                raise UserError(f"chat template of {self.name} failed: {err}") from err
            text = self._apply_template([{"role": "user", "content": f"{system}\n\n{instruction}"}])
        return text + (reply or "")

    def _apply_template(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, instructions: Sequence[str], system: str | None = None) -> PromptBatch:
        """Chat-format, tokenize and left-pad; records the post-instruction token count per prompt."""
        if len(instructions) == 0:
            raise UserError("no prompts to encode: the prompt set is empty")
        texts, n_post = [], []
        for ins in instructions:
            text = self.format_chat(ins, system=system)
            end = text.rfind(ins) + len(ins) if ins and ins in text else len(text)
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            n_post.append(sum(1 for s, _ in enc["offset_mapping"] if s >= end))
            texts.append(text)
        return self.encode_texts(texts, n_post=n_post, add_special_tokens=False)

    def encode_texts(self, texts: Sequence[str], n_post: list[int] | None = None,
                     add_special_tokens: bool = False, max_length: int | None = None) -> PromptBatch:
        """Tokenize already formatted texts (chat strings, or raw text for CE loss) with left padding."""
        enc = self.tokenizer(list(texts), add_special_tokens=add_special_tokens, padding=True,
                             truncation=max_length is not None, max_length=max_length,
                             return_tensors="pt")
        return PromptBatch(enc["input_ids"], enc["attention_mask"],
                           n_post if n_post is not None else [0] * len(texts), list(texts))

    # ----------------------------------------------------------------- hooks
    @contextmanager
    def hooks(self, fns: dict[HookPoint, HookFn | list[HookFn]] | None = None) -> Iterator[None]:
        """Install residual hooks (layer index or "embed" → function(s)) for a `with` block."""
        lists = {k: (v if isinstance(v, list) else [v]) for k, v in (fns or {}).items()}
        with self._hooks.installed(lists):
            yield

    @contextmanager
    def _chunk(self, prompt_len: int | None, row_offset: int):
        self._hooks.prompt_len, self._hooks.row_offset = prompt_len, row_offset
        try:
            yield
        finally:
            self._hooks.prompt_len, self._hooks.row_offset = None, 0

    # ----------------------------------------------------------------- compute
    def _chunks(self, batch: PromptBatch, batch_size: int | None, desc: str, quiet: bool):
        size = batch_size or len(batch)
        starts = range(0, len(batch), size)
        for start in tqdm(starts, desc=desc, disable=quiet or len(starts) <= 1, leave=False):
            yield start, batch.rows(start, min(start + size, len(batch)))

    @torch.inference_mode()
    def _forward(self, sub: PromptBatch, logits_to_keep: int | None):
        ids = sub.input_ids.to(self.device)
        mask = sub.attention_mask.to(self.device)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        with self._compiled.on() if self._compiled is not None else nullcontext():
            return self.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)

    @halve_on_oom
    def logits(self, batch: PromptBatch, last: int | None = 1, batch_size: int | None = None,
               quiet: bool = True) -> Tensor:
        """Logits of the last `last` positions (all positions if None), fp32 on CPU: [B, last, V]."""
        out = []
        for start, sub in self._chunks(batch, batch_size, "forward", quiet):
            with self._chunk(None, start):
                res = self._forward(sub, last)
            out.append(res.logits.float().cpu())
        return _cat_left_padded(out)

    @halve_on_oom
    def next_token_losses(self, batch: PromptBatch, batch_size: int | None = None, quiet: bool = True,
                          positions: int = 128) -> tuple[Tensor, Tensor]:
        """Per row, the summed next-token cross-entropy over real token pairs and their count (fp64
        and int64 on CPU). log_softmax + gather run where the logits are, `positions` at a time in
        fp32: the host gets 2 numbers per row, never [B, T, V] logits (16.8 GB in fp32 per 64 × 256
        chunk at Gemma's 256k vocabulary)."""
        sums, counts = [], []
        for start, sub in self._chunks(batch, batch_size, "forward", quiet):
            with self._chunk(None, start):
                logits = self._forward(sub, None).logits
            ids, mask = sub.input_ids.to(logits.device), sub.attention_mask.to(logits.device).bool()
            valid = mask[:, :-1] & mask[:, 1:]
            total = torch.zeros(len(sub), dtype=torch.float64, device=logits.device)
            for a in range(0, logits.shape[1] - 1, positions):
                b = min(a + positions, logits.shape[1] - 1)
                nll = -torch.log_softmax(logits[:, a:b].float(), -1).gather(-1, ids[:, a + 1:b + 1, None])[..., 0]
                total += (nll * valid[:, a:b]).sum(1).double()
            sums.append(total.cpu())
            counts.append(valid.sum(1).cpu())
        return torch.cat(sums), torch.cat(counts)

    @halve_on_oom
    def next_token_probs(self, batch: PromptBatch, batch_size: int | None = None, quiet: bool = True,
                         columns: Sequence[int] | None = None) -> Tensor:
        """P(next token) at the last prompt position, fp32 on CPU: [B, V], or [B, len(columns)] for
        the given token ids. The softmax runs where the logits are, so a pass that needs P("I")
        copies B numbers, not B × V (51 MB per pass of 64 rows at Gemma's vocabulary)."""
        out = []
        cols = None if columns is None else torch.as_tensor(list(columns), dtype=torch.long, device=self.device)
        for start, sub in self._chunks(batch, batch_size, "forward", quiet):
            with self._chunk(None, start):
                p = torch.softmax(self._forward(sub, 1).logits[:, -1].float(), dim=-1)
            out.append((p if cols is None else p[:, cols]).cpu())
        return torch.cat(out)

    @halve_on_oom
    def residuals(self, batch: PromptBatch, layers: Sequence[HookPoint], positions: int | None = None,
                  batch_size: int | None = None, quiet: bool = True, host: bool = True) -> dict[HookPoint, Tensor]:
        """Residual stream at each layer: [B, positions, d] for the last `positions` tokens
        (all, left-padded, if None). Runs the decoder only as deep as the deepest layer asked.
        `host=False` leaves them on the model's device in its dtype, for callers that reduce them
        there (a 65k-wide SAE's activations need not cross to the host)."""
        store: dict[HookPoint, list[Tensor]] = {p: [] for p in layers}

        def grab(point):
            def fn(h, step):
                h = h if positions is None else h[:, -positions:]
                store[point].append(h.float().cpu() if host else h.detach())
            return fn

        deepest = max((p for p in layers if p != EMBED), default=0)
        for start, sub in self._chunks(batch, batch_size, "residuals", quiet):
            with self.hooks({p: grab(p) for p in layers}), self._chunk(None, start), \
                    _stop_after(self.layers[deepest]):
                try:
                    self._forward(sub, 1)
                except _StopForward:
                    pass
        return {p: _cat_left_padded(v) for p, v in store.items()}

    def generate(self, batch: PromptBatch, max_new_tokens: int = 64, batch_size: int | None = None,
                 quiet: bool = True, desc: str = "generate") -> list[str]:
        """Greedy completions (special tokens stripped), hooks applied at every step."""
        return self.generate_full(batch, max_new_tokens, batch_size, quiet, desc).texts

    @halve_on_oom
    @torch.inference_mode()
    def generate_full(self, batch: PromptBatch, max_new_tokens: int = 64, batch_size: int | None = None,
                      quiet: bool = True, desc: str = "generate") -> Generation:
        """`generate`, plus per row whether it ended and P(refusal tokens) at its first step."""
        replies: list[str] = []
        ended: list[bool] = []
        p_refusal: list[Tensor] = []
        for start, sub in self._chunks(batch, batch_size, desc, quiet):
            ids = sub.input_ids.to(self.device)
            mask = sub.attention_mask.to(self.device)
            first = _FirstStepRefusal(self.refusal_token_ids)
            with self._chunk(ids.shape[1], start):
                seq = self.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new_tokens,
                                       pad_token_id=self.tokenizer.pad_token_id,
                                       eos_token_id=self.tokenizer.eos_token_id, top_p=None,
                                       top_k=None, temperature=None, logits_processor=[first])
            new = seq[:, ids.shape[1]:].cpu()
            replies.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
            ended.extend((new == self.tokenizer.eos_token_id).any(dim=1).tolist())
            assert first.p is not None  # set at the first generated position
            p_refusal.append(first.p)
        return Generation([r.strip() for r in replies], ended, torch.cat(p_refusal))


class _FirstStepRefusal:
    """Logits processor that only records P(refusal tokens) at the first generated position
    (keeping every step's logits would cost B x V per step)."""

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = list(token_ids)
        self.p: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.p is None:
            self.p = torch.softmax(scores.float(), dim=-1)[:, self.token_ids].sum(1).cpu()
        return scores


@dataclass
class Generation:
    """Greedy completions with what the decoded text cannot tell: whether each row emitted
    end-of-sequence (rather than running out of tokens; stripping changes the token count) and
    P(refusal tokens) at the first generated position (the first-token judge's score)."""

    texts: list[str]
    ended: list[bool]
    p_refusal: Tensor  # [B]


class _StopForward(Exception):
    pass


@contextmanager
def _stop_after(layer):
    """Abort the forward pass after `layer`: residual reads need nothing deeper."""
    def hook(module, args, output):
        raise _StopForward
    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _cat_left_padded(chunks: list[Tensor]) -> Tensor:
    width = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, 0, width - c.shape[1], 0)) for c in chunks])


def load_chat_model(source: str | os.PathLike, *, gguf_file: str | None = None, dtype: str = "auto",
                    device: str = "auto", name: str | None = None, system_prompt: str | None = None,
                    refusal_tokens: Sequence[str] = ("I",), quiet: bool = False,
                    chat_template: str | None = None, trust_remote_code: bool = False,
                    compile: bool = False) -> ChatModel:
    """Load from a hub id, a local directory, or a `.gguf` file (dequantised by transformers).
    `trust_remote_code` (off unless the config turns it on) lets a repository run its own code;
    `compile` compiles the decoder layers for forward passes (`ChatModel.compile`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src = Path(source)
    if src.suffix == ".gguf":
        if not src.is_file():
            raise UserError(f"GGUF file {src} not found: check the path")
        src, gguf_file = src.parent, src.name
    elif (str(source).startswith((".", "/", "~")) or src.exists()) and not src.is_dir():
        raise UserError(f"model folder {src} not found: pass a local model folder, a .gguf file "
                        "or a HuggingFace hub id")
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    kwargs["trust_remote_code"] = bool(trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(src), **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=dt, **kwargs)
    except OSError as err:
        raise UserError(f"could not load model {source!r} ({str(err).splitlines()[0]}): without "
                        "network access, download it first and pass the local folder") from err
    cast(torch.nn.Module, hf).to(dev)  # transformers wraps `to`; its stub misses the bound self
    if chat_template:
        tok.chat_template = chat_template
    model = ChatModel(hf, tok, name=name or str(source), system_prompt=system_prompt,
                      refusal_tokens=refusal_tokens)
    return model.compile() if compile else model
