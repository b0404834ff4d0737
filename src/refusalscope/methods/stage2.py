"""Stage 2: the paper's Algorithm 1 (block-wise selection of a faithful latent set).

    K ← ∅;  while |C∖K| ≥ N:  draw V ⊆ C∖K, |V| = N;
        if Δ(p,K,V) ≥ τ: K ← K ∪ V  else: C ← C∖V
    Δ(p,K,V) = |P(p, C∖K) − P(p, C∖(K∪V))| / P(p, C∖K),  P(p, A) = Pr("I" | p, A ablated)

Both branches remove V from C∖K, so the set ablated before step t is "the blocks not yet
visited" whatever was decided, and with the draw V = rng.sample(sorted(C∖K), N) the blocks
themselves are decision-independent too. For a seed, all m+1 states are known up front: one
batched forward gives every P, and every τ reuses the same Δs. `literal_algorithm1` is the
sequential form, kept to check that both give identical sets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..interventions.features import Feature, FeatureSet
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged, refusal_probs
from .records import Stage2Record, TauOutcome

PAPER_TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def draw_blocks(candidates: Sequence[Feature], n: int, seed: int) -> list[list[Feature]]:
    """The blocks Algorithm 1 visits for this seed, in order (remainder < n never visited)."""
    rng = random.Random(seed)
    remaining = sorted(set(map(Feature.of, candidates)))
    blocks = []
    while len(remaining) >= n:
        block = rng.sample(remaining, n)
        blocks.append(sorted(block))
        chosen = set(block)
        remaining = [f for f in remaining if f not in chosen]
    return blocks


def delta(p_before: float, p_after: float) -> float:
    if p_before <= 0.0:
        return float("inf") if p_after != p_before else 0.0
    return abs(p_before - p_after) / p_before


def literal_algorithm1(p_fn: Callable[[frozenset], float], candidates: Sequence[Feature], n: int,
                       tau: float, seed: int) -> set[Feature]:
    """Algorithm 1 as written, one P evaluation at a time (for tests and benchmarks)."""
    rng = random.Random(seed)
    C, K = set(map(Feature.of, candidates)), set[Feature]()
    while len(C - K) >= n:
        V = set(rng.sample(sorted(C - K), n))
        if delta(p_fn(frozenset(C - K)), p_fn(frozenset(C - (K | V)))) >= tau:
            K |= V
        else:
            C -= V
    return K


def states(candidates: Sequence[Feature], blocks: list[list[Feature]]) -> list[frozenset]:
    """U_0 = C, U_{t+1} = U_t ∖ block_t: the ablated set before each step (and after the last)."""
    cur = set(map(Feature.of, candidates))
    out = [frozenset(cur)]
    for b in blocks:
        cur -= set(b)
        out.append(frozenset(cur))
    return out


@dataclass
class Algorithm1Trace:
    seed: int
    blocks: list[list[Feature]]
    probs: list[float]  # P(U_t), t = 0..m

    @property
    def deltas(self) -> list[float]:
        return [delta(self.probs[t], self.probs[t + 1]) for t in range(len(self.blocks))]

    def selected(self, tau: float) -> set[Feature]:
        return {f for b, d in zip(self.blocks, self.deltas) if d >= tau for f in b}


def batched_traces(model: ChatModel, saes, prompt: str, candidates: Sequence[Feature], n: int,
                   seeds: Sequence[int], batch_size: int, positions="all") -> list[Algorithm1Trace]:
    """P(U_t) for every seed's states in batched forward passes (duplicate states shared)."""
    per_seed = []
    unique: dict[frozenset, int] = {}
    for s in seeds:
        blocks = draw_blocks(candidates, n, s)
        sts = states(candidates, blocks)
        per_seed.append((s, blocks, sts))
        for st in sts:
            unique.setdefault(st, len(unique))
    order = list(unique)
    plans = [FeatureSet(sorted(st)).plan(positions) for st in order]
    probs = refusal_probs(model, saes, [prompt] * len(order), plans=plans, batch_size=batch_size)
    p_of = {st: probs[i].item() for st, i in unique.items()}
    return [Algorithm1Trace(s, blocks, [p_of[st] for st in sts]) for s, blocks, sts in per_seed]


def consensus(traces: Sequence[Algorithm1Trace], tau: float) -> set[Feature]:
    """Latents selected with every seed (the paper keeps only those)."""
    sets = [t.selected(tau) for t in traces]
    return set.intersection(*sets) if sets else set()


def forward_passes(n_candidates: int, n: int, n_seeds: int, n_taus: int, batch_size: int) -> dict:
    """Forward passes one prompt costs: literal Algorithm 1 evaluates two P per step for every
    (τ, seed), one after another; the batched form evaluates each seed's m+1 states once, as
    rows of `batch_size`-row passes."""
    m = n_candidates // n
    rows = n_seeds * (m + 1)
    return {"literal_sequential": 2 * m * n_taus * n_seeds, "batched_rows": rows,
            "batched_sequential": -(-rows // batch_size)}


def minimal_set(model: ChatModel, saes, prompt_id: str, prompt: str, candidates: Sequence, judge: Judge, *,
                block_size: int = 5, taus: Sequence[float] = PAPER_TAUS, seeds: Sequence[int] = (0, 1, 2),
                batch_size: int = 32, max_new_tokens: int = 64, generation_batch_size: int = 16) -> Stage2Record:
    """Stage 2 for one prompt: Algorithm 1 for every seed, the consensus set per τ, each distinct
    set judged by generation, and the smallest jailbreaking set (larger τ on ties)."""
    cands = FeatureSet(candidates)
    traces = batched_traces(model, saes, prompt, list(cands), block_size, seeds, batch_size)
    by_tau = {tau: FeatureSet(sorted(consensus(traces, tau))) for tau in taus}
    distinct = sorted({s for s in by_tau.values() if s}, key=lambda s: (len(s), s.ids()))
    j = generate_judged(model, saes, [prompt] * len(distinct), [s.plan() for s in distinct], judge,
                        max_new_tokens, generation_batch_size)
    verdict = {s: (c, jb, v.judge) for s, c, jb, v in zip(distinct, j.completions, j.jailbroken, j.verdicts())}
    per_tau = [TauOutcome(tau, s, bool(s) and verdict[s][1], verdict[s][0] if s else None,
                          verdict[s][2] if s else None) for tau, s in by_tau.items()]
    wins = [t for t in per_tau if t.jailbroken]
    best = min(wins, key=lambda t: (t.size, -t.tau)) if wins else None
    return Stage2Record(prompt_id, len(cands), per_tau, {t.seed: t.deltas for t in traces},
                        forward_passes(len(cands), block_size, len(seeds), len(taus), batch_size),
                        best.features if best else None, best.tau if best else None)
