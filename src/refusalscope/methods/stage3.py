"""Stage 3 ablation sweeps (the paper's Table 2 and the FM-vs-probe comparison).

Per harmful prompt, ablate its active Stage 2 latents plus the top-K latents of a Stage 3
ranking, K = 100, 200, …, 2000, and report the smallest K that jailbreaks. The ladder runs like
Stage 1's `search_k`: a few rungs per round for every prompt still refusing, one batched
generation per round, so the answer equals the sequential loop's at a fraction of the rounds.
`ladder_search` is that loop with a per-(prompt, K) plan, which Stage 1's shared plans are a
special case of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..interventions.spec import FeatureAblation, Intervention
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged
from .fm_data import Feature
from .stage1 import Stage1Result

LadderResult = Stage1Result  # prompt_id, k (smallest jailbreaking K or None), tried, completions, verdicts
PAPER_KS = tuple(range(100, 2001, 100))
PROBE_KS = (100, 500, 1000, 2000)


def ladder_search(model: ChatModel, saes, prompts: Sequence[tuple[Hashable, str]], ks: Sequence[int],
                  plan_for: Callable[[Hashable, int], list[Intervention]], judge: Judge,
                  max_new_tokens: int, batch_size: int, rungs_per_round: int = 3, quiet: bool = True,
                  on_done=None, desc: str = "K ladder") -> list[LadderResult]:
    """Smallest K (ascending `ks`) per (id, text) whose plan `plan_for(id, K)` jailbreaks it;
    `on_done(result)` as each prompt finishes (for checkpointing)."""
    ks = list(ks)
    results = {pid: LadderResult(pid, None) for pid, _ in prompts}
    open_ = list(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=quiet)
    for start in range(0, len(ks), rungs_per_round):
        rungs = ks[start:start + rungs_per_round]
        rows = [(pid, text, k) for pid, text in open_ for k in rungs]
        if not rows:
            break
        j = generate_judged(model, saes, [t for _, t, _ in rows], [plan_for(pid, k) for pid, _, k in rows],
                            judge, max_new_tokens, batch_size)
        for (pid, _, k), comp, ref, deg, jb in zip(rows, j.completions, j.refused, j.degenerate, j.jailbroken):
            r = results[pid]
            r.tried.append(k)
            r.completions[k] = comp
            r.verdicts[k] = {"refused": ref, "degenerate": deg, "jailbroken": jb}
        still = []
        for pid, text in open_:
            r = results[pid]
            hit = [k for k in rungs if r.verdicts[k]["jailbroken"]]
            if hit or rungs[-1] == ks[-1]:
                r.k = min(hit) if hit else None
                r.tried = [k for k in r.tried if r.k is None or k <= r.k]
                bar.update(1)
                if on_done:
                    on_done(r)
            else:
                still.append((pid, text))
        open_ = still
    bar.close()
    return [results[pid] for pid, _ in prompts]


def _features(ranked: Sequence) -> list[Feature]:
    """Accept a plain feature list or the (feature, score) pairs the rankers return."""
    out = []
    for r in ranked:
        f = r[0] if isinstance(r[0], (tuple, list)) else r
        out.append((int(f[0]), int(f[1])))
    return out


def combined_plan(stage2: Sequence[Feature], ranked: Sequence[Feature], k: int, positions="all") -> list[Intervention]:
    """Ablate the prompt's Stage 2 latents and the top-k ranked Stage 3 latents."""
    return [FeatureAblation.from_ids(list(stage2) + list(ranked[:k]), positions)]


def stage3_search(model: ChatModel, saes, prompts: Sequence[tuple[Hashable, str]],
                  active_stage2: Mapping[Hashable, Sequence[Feature]], ranked: Sequence,
                  ks: Sequence[int] = PAPER_KS, *, judge: Judge, max_new_tokens: int, batch_size: int,
                  rungs_per_round: int = 3, positions="all", quiet: bool = True,
                  on_done=None) -> list[LadderResult]:
    """Table 2: per prompt, the smallest K whose ablation of (its active Stage 2 latents ∪ the
    top-K of `ranked`) jailbreaks it. A prompt without an `active_stage2` entry gets the
    Stage 3 latents alone."""
    feats = _features(ranked)
    ks = sorted(set(int(k) for k in ks))
    return ladder_search(model, saes, prompts, ks,
                         lambda pid, k: combined_plan(active_stage2.get(pid, ()), feats, k, positions),
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
                active_stage2: Mapping[Hashable, Sequence[Feature]], probe_ranked: Sequence,
                fm_ranked: Sequence | None = None, ks: Sequence[int] = PROBE_KS, *, judge: Judge,
                max_new_tokens: int, batch_size: int, positions="all", rows_per_call: int = 256,
                quiet: bool = True) -> SweepResult:
    """FM vs linear probe: jailbreaks per K when ablating each prompt's active Stage 2 latents plus
    the probe's (and, for the side-by-side table, the FM's) top-K, as in `stage3_search`."""
    rankings = {"probe": _features(probe_ranked)}
    if fm_ranked is not None:
        rankings["fm"] = _features(fm_ranked)
    ks = sorted(set(int(k) for k in ks))
    rows = [(p, pid, text, name, j) for p, (pid, text) in enumerate(prompts)
            for name in rankings for j in range(len(ks))]
    out = {name: np.zeros((len(prompts), len(ks)), dtype=bool) for name in rankings}
    for s in tqdm(range(0, len(rows), rows_per_call), desc="probe sweep", disable=quiet):
        chunk = rows[s:s + rows_per_call]
        plans = [combined_plan(active_stage2.get(pid, ()), rankings[name], ks[j], positions)
                 for _, pid, _, name, j in chunk]
        jb = generate_judged(model, saes, [t for _, _, t, _, _ in chunk], plans, judge, max_new_tokens,
                             batch_size).jailbroken
        for (p, _, _, name, j), hit in zip(chunk, jb):
            out[name][p, j] = hit
    return SweepResult([pid for pid, _ in prompts], ks, out)
