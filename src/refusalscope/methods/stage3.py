"""Stage 3 ablation sweeps (the paper's Table 2 and the FM-vs-probe comparison).

Per harmful prompt, ablate its active Stage 2 latents plus the top-K latents of a Stage 3
ranking, K = 100, 200, …, 2000, and report the smallest K that jailbreaks: the shared K ladder
of `ladder.py` with a per-(prompt, K) plan. A ranking is one list shared by every prompt (the
global ranking, the probe's) or a mapping prompt id → that prompt's own list.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..interventions.features import Feature, FeatureSet
from ..interventions.spec import Intervention
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged
from .ladder import ladder_search
from .records import LadderRecord

PAPER_KS = tuple(range(100, 2001, 100))
PROBE_KS = (100, 500, 1000, 2000)


def ranked_features(ranked: Sequence) -> list[Feature]:
    """A plain feature list from features or the (feature, score) pairs the rankers return."""
    out = []
    for r in ranked:
        is_pair = isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], (tuple, list, str))
        out.append(Feature.of(r[0] if is_pair else r))
    return out


Ranking = Sequence | Mapping[Any, Sequence]


def per_prompt(ranked: Ranking) -> Callable[[Hashable], list[Feature]]:
    """A lookup prompt id → its ranked features, for a shared list or a per-prompt mapping (a
    prompt missing from the mapping has an empty ranking)."""
    if isinstance(ranked, Mapping):
        lists = {pid: ranked_features(r) for pid, r in ranked.items()}
        return lambda pid: lists.get(pid, [])
    shared = ranked_features(ranked)
    return lambda pid: shared


def combined_plan(stage2: Sequence, ranked: Sequence[Feature], k: int, positions="all") -> list[Intervention]:
    """Ablate the prompt's Stage 2 latents and the top-k ranked Stage 3 latents."""
    return FeatureSet([*stage2, *ranked[:k]]).plan(positions)


def stage3_search(model: ChatModel, saes, prompts: Sequence[tuple[Hashable, str]],
                  active_stage2: Mapping[Any, Sequence], ranked: Ranking,
                  ks: Sequence[int] = PAPER_KS, *, judge: Judge, max_new_tokens: int, batch_size: int,
                  rungs_per_round: int = 3, positions="all", quiet: bool = True,
                  on_done=None) -> list[LadderRecord]:
    """Table 2: per prompt, the smallest K whose ablation of (its active Stage 2 latents ∪ the
    top-K of its ranking) jailbreaks it. A prompt without an `active_stage2` entry gets the
    Stage 3 latents alone."""
    feats = per_prompt(ranked)
    return ladder_search(model, saes, prompts, ks,
                         lambda pid, k: combined_plan(active_stage2.get(pid, ()), feats(pid), k, positions),
                         judge, max_new_tokens, batch_size, rungs_per_round, quiet, on_done, "stage 3 (K ladder)")


@dataclass
class SweepResult:
    """Per ranking, jailbroken[name][p, j] for prompt p at ks[j] (every K evaluated, no early stop)."""

    prompt_ids: list
    ks: list[int]
    jailbroken: dict[str, np.ndarray]

    def counts(self) -> pd.DataFrame:
        """One row per K (and "any": prompts jailbroken at some K), one column per ranking."""
        table = {name: [int(v[:, j].sum()) for j in range(len(self.ks))] + [int(v.any(1).sum())]
                 for name, v in self.jailbroken.items()}
        return pd.DataFrame({"k": [str(k) for k in self.ks] + ["any"], **table})


def probe_sweep(model: ChatModel, saes, prompts: Sequence[tuple[Hashable, str]],
                active_stage2: Mapping[Any, Sequence], probe_ranked: Ranking,
                fm_ranked: Ranking | None = None, ks: Sequence[int] = PROBE_KS, *, judge: Judge,
                max_new_tokens: int, batch_size: int, positions="all", rows_per_call: int = 256,
                quiet: bool = True) -> SweepResult:
    """FM vs linear probe: jailbreaks per K when ablating each prompt's active Stage 2 latents plus
    the probe's (and, for the side-by-side table, the FM's) top-K, as in `stage3_search`."""
    rankings = {"probe": per_prompt(probe_ranked)}
    if fm_ranked is not None:
        rankings["fm"] = per_prompt(fm_ranked)
    ks = sorted(set(int(k) for k in ks))
    rows = [(p, pid, text, name, j) for p, (pid, text) in enumerate(prompts)
            for name in rankings for j in range(len(ks))]
    out = {name: np.zeros((len(prompts), len(ks)), dtype=bool) for name in rankings}
    for s in tqdm(range(0, len(rows), rows_per_call), desc="probe sweep", disable=quiet):
        chunk = rows[s:s + rows_per_call]
        plans = [combined_plan(active_stage2.get(pid, ()), rankings[name](pid), ks[j], positions)
                 for _, pid, _, name, j in chunk]
        jb = generate_judged(model, saes, [t for _, _, t, _, _ in chunk], plans, judge, max_new_tokens,
                             batch_size).jailbroken
        for (p, _, _, name, j), hit in zip(chunk, jb):
            out[name][p, j] = hit
    return SweepResult([pid for pid, _ in prompts], ks, out)
