"""The batched K-ladder search shared by Stage 1 (top-K aligned latents per layer) and Stage 3
(a prompt's Stage 2 latents plus the top-K ranked Stage 3 latents).

Per prompt the answer is the smallest K (ascending rungs) whose ablation plan jailbreaks it. A
few rungs are generated per round for every prompt still refusing, one batched generation per
round, so a prompt that breaks at the second rung costs one round, and the answer equals the
sequential loop's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from tqdm.auto import tqdm

from ..interventions.spec import Intervention
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged
from .records import LadderRecord, Verdict


def ladder(start: int, step: int, k_max: int) -> list[int]:
    """The rungs start, start + step, … up to k_max."""
    return list(range(start, k_max + 1, step))


def ladder_search(model: ChatModel, saes, prompts: Sequence[tuple[Hashable, str]], ks: Sequence[int],
                  plan_for: Callable[[Hashable, int], list[Intervention]], judge: Judge,
                  max_new_tokens: int, batch_size: int, rungs_per_round: int = 3, quiet: bool = True,
                  on_done: Callable[[LadderRecord], None] | None = None,
                  desc: str = "K ladder") -> list[LadderRecord]:
    """Smallest K of ascending `ks` per (id, text) whose plan `plan_for(id, K)` jailbreaks it;
    `on_done(record)` is called as each prompt finishes (for checkpointing)."""
    ks = sorted(set(int(k) for k in ks))
    results = {pid: LadderRecord(str(pid)) for pid, _ in prompts}
    open_ = list(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=quiet)
    for start in range(0, len(ks), rungs_per_round):
        rungs = ks[start:start + rungs_per_round]
        rows = [(pid, text, k) for pid, text in open_ for k in rungs]
        if not rows:
            break
        j = generate_judged(model, saes, [t for _, t, _ in rows], [plan_for(pid, k) for pid, _, k in rows],
                            judge, max_new_tokens, batch_size)
        for (pid, _, k), comp, verdict in zip(rows, j.completions, j.verdicts()):
            r = results[pid]
            r.tried.append(k)
            r.completions[k] = comp
            r.verdicts[k] = verdict
        still = []
        for pid, text in open_:
            r = results[pid]
            hit = [k for k in rungs if r.verdicts[k].jailbroken]
            if hit or rungs[-1] == ks[-1]:
                _close(r, min(hit) if hit else None)
                bar.update(1)
                if on_done:
                    on_done(r)
            else:
                still.append((pid, text))
        open_ = still
    bar.close()
    return [results[pid] for pid, _ in prompts]


def _close(r: LadderRecord, k: int | None) -> None:
    """Set the answer and keep only the rungs up to it (later rungs of its round are moot)."""
    r.k = k
    r.tried = [t for t in r.tried if k is None or t <= k]
    r.completions = {t: c for t, c in r.completions.items() if t in r.tried}
    r.verdicts = {t: v for t, v in r.verdicts.items() if t in r.tried}


__all__ = ["LadderRecord", "Verdict", "ladder", "ladder_search"]
