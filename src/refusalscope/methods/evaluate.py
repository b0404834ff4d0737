"""Shared measurements under interventions: judged generations and P(refusal token), one batch
of rows each carrying its own intervention plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..interventions.engine import intervene
from ..interventions.spec import Intervention
from ..io.model import ChatModel
from ..measures.cascade import CascadeJudge
from ..measures.judges import Judge, is_degenerate
from .records import Verdict


@dataclass
class Judged:
    """Per row: completion, refused, degenerate, and jailbroken (= complied with a coherent reply;
    a degenerate reply is not a jailbreak, as in the paper); `judge` names the configured judge,
    `decided_by` per row the one that made the call (a cascade's first pass or final judge)."""

    completions: list[str]
    refused: list[bool]
    degenerate: list[bool]
    scores: list[float]
    degenerate_is_jailbreak: bool = False
    judge: str | None = None
    decided_by: list[str] | None = None

    @property
    def jailbroken(self) -> list[bool]:
        return [not r and (self.degenerate_is_jailbreak or not d)
                for r, d in zip(self.refused, self.degenerate)]

    def verdicts(self) -> list[Verdict]:
        by: Sequence[str | None] = self.decided_by or [self.judge] * len(self)
        return [Verdict(bool(r), bool(d), bool(j), b)
                for r, d, j, b in zip(self.refused, self.degenerate, self.jailbroken, by)]

    def records(self, prompts: Sequence[str]) -> list[dict]:
        """One JSON-able row per prompt: prompt, completion, refused, degenerate, jailbroken,
        score, decided_by."""
        by: Sequence[str | None] = self.decided_by or [self.judge] * len(self)
        return [{"prompt": p, "completion": c, "refused": bool(r), "degenerate": bool(d),
                 "jailbroken": bool(j), "score": float(s), "decided_by": b}
                for p, c, r, d, j, s, b in zip(prompts, self.completions, self.refused, self.degenerate,
                                                self.jailbroken, self.scores, by)]

    def __len__(self) -> int:
        return len(self.completions)


def generate_judged(model: ChatModel, saes, prompts: Sequence[str], plans: Sequence[Sequence[Intervention]] | None,
                    judge: Judge, max_new_tokens: int, batch_size: int, quiet: bool = True,
                    shared: Sequence[Intervention] = (), desc: str = "generate") -> Judged:
    """Generate for each row (prompt i with plan i) and judge the completions. With a cascade
    judge that sets `first_pass_tokens`, every row first gets a short opening; only rows its
    first pass does not settle as refused (and that did not end) are generated in full."""
    if not prompts:
        return Judged([], [], [], [])
    if isinstance(judge, CascadeJudge) and judge.first_pass_tokens and judge.first_pass_tokens < max_new_tokens:
        return _generate_cascade(model, saes, prompts, plans, judge, max_new_tokens, batch_size, quiet,
                                 shared, desc)
    batch = model.encode(list(prompts))
    with intervene(model, saes, shared=shared, rows=plans):
        replies = model.generate(batch, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 quiet=quiet, desc=desc)
        # inside the block: a judge that reads the model (first-token) sees the same row plans
        v = judge.judge(list(prompts), replies if judge.needs_completions else None,
                        model=model if judge.needs_model else None, batch_size=batch_size)
    return _judged(judge, replies, v)


def _judged(judge: Judge, replies: list[str], v) -> Judged:
    degenerate = list(v.degenerate) if any(v.degenerate) else [is_degenerate(r) for r in replies]
    return Judged(replies, list(v.refused), degenerate, list(v.scores), judge.degenerate_is_jailbreak,
                  v.judge, list(v.decided_by))


def _generate_cascade(model: ChatModel, saes, prompts: Sequence[str], plans, judge: CascadeJudge,
                      max_new_tokens: int, batch_size: int, quiet: bool, shared, desc: str) -> Judged:
    """Openings for every row, the first pass on them, full replies for the rows left open (greedy
    decoding under the same plan, so a full reply begins with its opening)."""
    prompts = list(prompts)
    with intervene(model, saes, shared=shared, rows=plans):
        opening = model.generate_full(model.encode(prompts), max_new_tokens=judge.first_pass_tokens,
                                      batch_size=batch_size, quiet=quiet, desc=f"{desc} (openings)")
    replies = list(opening.texts)
    first = judge.first_refusals(prompts, replies)
    todo = [i for i, (f, ended) in enumerate(zip(first, opening.ended)) if not f and not ended]
    if todo:
        sub_plans = None if plans is None else [plans[i] for i in todo]
        with intervene(model, saes, shared=shared, rows=sub_plans):
            full = model.generate(model.encode([prompts[i] for i in todo]), max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, quiet=quiet, desc=desc)
        for i, text in zip(todo, full):
            replies[i] = text
    return _judged(judge, replies, judge.judge(prompts, replies, batch_size=batch_size, first_refused=first))


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
