"""The judge registry: decide, per prompt, whether the model refused, with a judge named in the config.

The judges share one interface (`Judge.judge(prompts, completions, model) -> Verdicts`):
- `substring`: refusal-phrase matching on completions, in the style of Arditi et al. (2024);
- `first-token`: probability of the refusal tokens ("I") at the last prompt position, read with
  whatever intervention hooks the caller has installed (the judge installs none itself);
- `classifier`: the HarmBench causal-LM classifier (`classifier_judge.py`), the paper's metric;
- `llama-guard`: a Llama-Guard-style chat-template safety classifier (`guard_judge.py`);
- `opening`: a refusal phrase at the start of the reply, the cheap first pass (`cascade.py`).

Imports point one way: this registry imports the judge modules, which import only `verdicts.py`
(the shared types) and each other downwards (guard_judge → classifier_judge). Names callers have
always imported from here (`Judge`, `Verdicts`, `is_degenerate`, …) are re-exported.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UserError
from .cascade import CascadeJudge, OpeningJudge
from .classifier_judge import ClassifierJudge
from .guard_judge import LlamaGuardJudge
from .simple_judges import FirstTokenJudge, SubstringJudge
from .verdicts import (
    REFUSAL_PHRASES,
    Judge,
    Verdicts,
    check_inputs,
    is_degenerate,
    normalise_quotes,
)

__all__ = ["REFUSAL_PHRASES", "ClassifierJudge", "FirstTokenJudge", "Judge", "LlamaGuardJudge", "OpeningJudge",
           "SubstringJudge", "Verdicts", "check_inputs", "is_degenerate", "judge_names", "make_cascade",
           "make_judge", "normalise_quotes", "register_judge"]


_REGISTRY: dict[str, Callable[..., Judge]] = {
    cls.name: cls for cls in (SubstringJudge, FirstTokenJudge, ClassifierJudge, LlamaGuardJudge, OpeningJudge)}


def register_judge(name: str):
    """Class decorator for a judge of one's own: make it available to `make_judge(name, **options)`
    (the built-in judges are listed above)."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def judge_names() -> list[str]:
    return sorted(_REGISTRY)


def make_judge(name: str, degenerate_is_jailbreak: bool = False, **options) -> Judge:
    """The judge `name` built with `options`; build it once per process and reuse it (the
    classifier judge loads its weights on first use)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown judge {name!r}: use one of {', '.join(judge_names())}")
    try:
        judge = _REGISTRY[name](**options)
    except TypeError as err:
        raise UserError(f"bad options for judge {name!r} ({err}): check the judge options") from err
    judge.degenerate_is_jailbreak = bool(degenerate_is_jailbreak)
    return judge


def make_cascade(final: Judge, first_pass: str | None, first_pass_options: dict | None = None,
                 first_pass_tokens: int | None = None) -> Judge:
    """`final` alone when there is no first pass, else the cascade in front of it."""
    if not first_pass:
        if first_pass_tokens is not None:
            raise UserError("judge.first_pass_tokens is set but judge.first_pass is not: name a "
                            "first pass (e.g. opening) or drop first_pass_tokens")
        return final
    first = make_judge(first_pass, **(first_pass_options or {}))
    return CascadeJudge(first, final, first_pass_tokens)
