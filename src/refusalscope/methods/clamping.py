"""BOS clamping of the woken hydra latents on benign prompts (paper "Redundant Features",
appendix Tables 5/6): set the latents to a fixed value at token 0 (<bos> / <|begin_of_text|>)
and generate greedily. Every (prompt, value) row plus an unclamped baseline row per prompt runs
in one batched generation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import UserError
from ..interventions.engine import intervene
from ..interventions.features import FeatureSet
from ..io.model import ChatModel

BENIGN_PROMPTS = ("Tell me a story.", "How to make pasta?", "What are the benefits of meditation?",
                  "Explain the theory of relativity in simple terms.",
                  "Tell me 20 prime numbers separated by space")
CLAMP_VALUES = (2, 4, 6, 8, 10)


def clamp_rows(prompts: Sequence[str], features: Iterable, values: Sequence[float],
               position: int = 0) -> list[tuple[str, object, list]]:
    """(prompt, clamp, plan) per row: a "baseline" row, then one row per value, for each prompt."""
    fs = FeatureSet(features)
    if not fs:
        raise UserError("no latents to clamp: pass the woken hydra latents as (layer, index) pairs")
    rows: list[tuple[str, object, list]] = []
    for p in prompts:
        rows.append((p, "baseline", []))
        for v in values:
            rows.append((p, v, [fs.clamp(v, positions=(position,))]))
    return rows


def bos_clamp(model: ChatModel, saes, features: Iterable, prompts: Sequence[str] = BENIGN_PROMPTS,
              values: Sequence[float] = CLAMP_VALUES, max_new_tokens: int = 32,
              batch_size: int = 16, position: int = 0, quiet: bool = True) -> list[dict]:
    """Rows {prompt, clamp ("baseline" or the value), response}, Table 5/6 layout."""
    if not prompts:
        raise UserError("no prompts to clamp on: pass benign prompts or use the default list")
    rows = clamp_rows(prompts, features, values, position)
    batch = model.encode([p for p, _, _ in rows])
    with intervene(model, saes, rows=[plan for *_, plan in rows]):
        replies = model.generate(batch, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 quiet=quiet, desc="BOS clamping")
    return [{"prompt": p, "clamp": c, "response": r} for (p, c, _), r in zip(rows, replies)]
