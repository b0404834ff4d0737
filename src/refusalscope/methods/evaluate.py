"""Shared measurements under interventions: judged generations and P(refusal token), one batch
of rows each carrying its own intervention plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..interventions.engine import intervene
from ..interventions.spec import Intervention
from ..io.model import ChatModel
from ..measures.judges import Judge, is_degenerate
from .records import Verdict


@dataclass
class Judged:
    """Per row: completion, refused, degenerate, and jailbroken (= complied with a coherent reply;
    a degenerate reply is not a jailbreak, as in the paper); `judge` names who decided."""

    completions: list[str]
    refused: list[bool]
    degenerate: list[bool]
    scores: list[float]
    degenerate_is_jailbreak: bool = False
    judge: str | None = None

    @property
    def jailbroken(self) -> list[bool]:
        return [not r and (self.degenerate_is_jailbreak or not d)
                for r, d in zip(self.refused, self.degenerate)]

    def verdicts(self) -> list[Verdict]:
        return [Verdict(bool(r), bool(d), bool(j), self.judge)
                for r, d, j in zip(self.refused, self.degenerate, self.jailbroken)]

    def __len__(self) -> int:
        return len(self.completions)


def generate_judged(model: ChatModel, saes, prompts: Sequence[str], plans: Sequence[Sequence[Intervention]] | None,
                    judge: Judge, max_new_tokens: int, batch_size: int, quiet: bool = True,
                    shared: Sequence[Intervention] = (), desc: str = "generate") -> Judged:
    """Generate for each row (prompt i with plan i) and judge the completions."""
    if not prompts:
        return Judged([], [], [], [])
    batch = model.encode(list(prompts))
    with intervene(model, saes, shared=shared, rows=plans):
        replies = model.generate(batch, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 quiet=quiet, desc=desc)
        # inside the block: a judge that reads the model (first-token) sees the same row plans
        v = judge.judge(list(prompts), replies if judge.needs_completions else None,
                        model=model if judge.needs_model else None, batch_size=batch_size)
    degenerate = list(v.degenerate) if any(v.degenerate) else [is_degenerate(r) for r in replies]
    return Judged(replies, list(v.refused), degenerate, list(v.scores), judge.degenerate_is_jailbreak,
                  v.judge)


def refusal_probs(model: ChatModel, saes, prompts: Sequence[str], plans=None, batch_size: int = 16,
                  shared: Sequence[Intervention] = (), quiet: bool = True,
                  full: bool = False) -> Tensor:
    """P(refusal token) at the last prompt position per row ([n]); with full=True the whole
    next-token distribution ([n, V])."""
    batch = model.encode(list(prompts))
    cols = None if full else model.refusal_token_ids  # only B numbers leave the device
    with intervene(model, saes, shared=shared, rows=plans):
        probs = model.next_token_probs(batch, batch_size=batch_size, quiet=quiet, columns=cols)
    return probs if full else probs.sum(1)


def kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) per row for probability rows."""
    p = p.clamp_min(1e-12)
    q = q.clamp_min(1e-12)
    return (p * (p.log() - q.log())).sum(-1)
