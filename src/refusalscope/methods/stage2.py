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

import numpy as np

from ..interventions.features import Feature, FeatureSet
from ..interventions.spec import RowAblations
from ..io.model import ChatModel
from ..measures.judges import Judge
from .evaluate import generate_judged, refusal_probs
from .records import Stage2Record, TauOutcome

PAPER_TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def draw_blocks(candidates: Sequence[Feature], n: int, seed: int) -> list[list[Feature]]:
    """The blocks Algorithm 1 visits for this seed, in order (remainder < n never visited).
    `rng.sample` picks positions from the length alone, so sampling positions of the sorted
    remaining list draws exactly the latents `rng.sample(sorted(C∖K), n)` draws."""
    rng = random.Random(seed)
    remaining = sorted(set(map(Feature.of, candidates)))
    blocks = []
    while len(remaining) >= n:
        picks = rng.sample(range(len(remaining)), n)
        blocks.append(sorted(remaining[j] for j in picks))
        for j in sorted(picks, reverse=True):
            del remaining[j]
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
    """P(U_t) for every seed's states of one prompt in batched forward passes (`shard_traces`)."""
    return shard_traces(model, saes, [(prompt, candidates)], n, seeds, batch_size, positions)[0]


def shard_traces(model: ChatModel, saes, items: Sequence[tuple[str, Sequence[Feature]]], n: int,
                 seeds: Sequence[int], batch_size: int, positions="all") -> list[list[Algorithm1Trace]]:
    """Every seed's states of every (prompt, candidates) item as rows of shared forward passes
    (duplicate states of a prompt computed once); the ablations go in as arrays (`RowAblations`)
    built from each candidate's removal step, never as one tuple per (row, latent)."""
    if not items:
        return []
    texts: list[str] = []
    layer_rows: dict[int, list[np.ndarray]] = {}
    layer_ids: dict[int, list[np.ndarray]] = {}
    plans = []
    for prompt, candidates in items:
        cands = sorted(set(map(Feature.of, candidates)))
        states, where, per_seed = _state_masks(cands, n, seeds)
        base = len(texts)
        texts += [prompt] * len(states)
        row, col = np.nonzero(states)
        lay = np.array([f.layer for f in cands], dtype=np.int64)[col]
        idx = np.array([f.index for f in cands], dtype=np.int64)[col]
        for layer in np.unique(lay):
            sel = lay == layer
            layer_rows.setdefault(int(layer), []).append(row[sel] + base)
            layer_ids.setdefault(int(layer), []).append(idx[sel])
        plans.append((base, where, per_seed))
    table = {l: (np.concatenate(layer_rows[l]), np.concatenate(layer_ids[l])) for l in layer_rows}
    probs = refusal_probs(model, saes, texts, plans=[[]] * len(texts), shared=[RowAblations(table, positions)],
                          batch_size=batch_size).tolist()
    return [[Algorithm1Trace(s, blocks, [probs[base + where[r]] for r in rows]) for s, blocks, rows in per_seed]
            for base, where, per_seed in plans]


def _state_masks(cands: list[Feature], n: int, seeds: Sequence[int]):
    """The distinct states of all seeds as a bool [states, candidates] table (first-seen order),
    the state of each (seed, step) row, and per seed (seed, blocks, its rows). U_t holds the
    candidates whose block comes at step t or later (never-visited ones: in every state)."""
    pos = {f: j for j, f in enumerate(cands)}
    masks, per_seed, first = [], [], 0
    for s in seeds:
        blocks = draw_blocks(cands, n, s)
        m = len(blocks)
        step = np.full(len(cands), m, dtype=np.int64)
        for t, b in enumerate(blocks):
            step[[pos[f] for f in b]] = t
        masks.append(step[None, :] >= np.arange(m + 1)[:, None])
        per_seed.append((s, blocks, list(range(first, first + m + 1))))
        first += m + 1
    allm = np.concatenate(masks) if masks else np.zeros((0, len(cands)), bool)
    keys = [r.tobytes() for r in np.packbits(allm, axis=1)]
    unique: dict[bytes, int] = {}
    where = [unique.setdefault(k, len(unique)) for k in keys]
    firsts: dict[int, int] = {}
    for r, u in enumerate(where):
        firsts.setdefault(u, r)
    states = allm[[firsts[u] for u in range(len(unique))]]
    return states, where, per_seed


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
    """Stage 2 for one prompt (`minimal_sets` with one item)."""
    return minimal_sets(model, saes, [(prompt_id, prompt, candidates)], judge, block_size=block_size, taus=taus,
                        seeds=seeds, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        generation_batch_size=generation_batch_size)[0]


def minimal_sets(model: ChatModel, saes, items: Sequence[tuple[str, str, Sequence]], judge: Judge, *,
                 block_size: int = 5, taus: Sequence[float] = PAPER_TAUS, seeds: Sequence[int] = (0, 1, 2),
                 batch_size: int = 32, max_new_tokens: int = 64,
                 generation_batch_size: int = 16) -> list[Stage2Record]:
    """Stage 2 for the (id, prompt, candidates) items of a shard: Algorithm 1 for every seed, the
    consensus set per τ, each distinct set judged by generation, and the smallest jailbreaking set
    (larger τ on ties). The states of all items share forward passes, and the τ-sets of all items
    one batched generation, so a shard costs full batches rather than one small batch per prompt."""
    if not items:
        return []
    cands = [FeatureSet(c) for _, _, c in items]
    traces = shard_traces(model, saes, [(text, list(c)) for (_, text, _), c in zip(items, cands)], block_size,
                          seeds, batch_size)
    by_tau = [{tau: FeatureSet(sorted(consensus(tr, tau))) for tau in taus} for tr in traces]
    distinct = [sorted({s for s in bt.values() if s}, key=lambda s: (len(s), s.ids())) for bt in by_tau]
    rows = [(i, s) for i, ds in enumerate(distinct) for s in ds]
    j = generate_judged(model, saes, [items[i][1] for i, _ in rows], [s.plan() for _, s in rows], judge,
                        max_new_tokens, generation_batch_size)
    verdicts: list[dict] = [{} for _ in items]
    for (i, fs), text, jb, v in zip(rows, j.completions, j.jailbroken, j.verdicts()):
        verdicts[i][fs] = (text, jb, v.judge)
    out = []
    for (pid, _, _), c, tr, bt, verdict in zip(items, cands, traces, by_tau, verdicts):
        per_tau = [TauOutcome(tau, s, bool(s) and verdict[s][1], verdict[s][0] if s else None,
                              verdict[s][2] if s else None) for tau, s in bt.items()]
        wins = [t for t in per_tau if t.jailbroken]
        best = min(wins, key=lambda t: (t.size, -t.tau)) if wins else None
        out.append(Stage2Record(pid, len(c), per_tau, {t.seed: t.deltas for t in tr},
                                forward_passes(len(c), block_size, len(seeds), len(taus), batch_size),
                                best.features if best else None, best.tau if best else None))
    return out
