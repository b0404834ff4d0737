"""Algorithm 1: the batched form (all states up front, every τ from the same Δs) gives exactly
the sets of the literal sequential algorithm, with real forward passes on a tiny Llama + SAEs."""

import pytest
from sae_fixtures import sae_set
from tiny import tiny_llama

from refusalscope.interventions.features import FeatureSet
from refusalscope.io.model import ChatModel
from refusalscope.measures.judges import make_judge
from refusalscope.methods.evaluate import refusal_probs
from refusalscope.methods.stage2 import (
    Algorithm1Trace,
    batched_traces,
    consensus,
    delta,
    draw_blocks,
    forward_passes,
    literal_algorithm1,
    minimal_set,
    minimal_sets,
    shard_traces,
    states,
)

TAUS = [0.05, 0.1, 0.2, 0.4, 0.8]


@pytest.fixture(scope="module")
def setup():
    model = ChatModel(*tiny_llama(), name="llama")
    saes = sae_set("jumprelu", [0, 1, 2], m=128)
    cands = [(l, i) for l in (0, 1, 2) for i in range(0, 120, 3)][:47]  # 47: a remainder of 2
    return model, saes, cands


@pytest.mark.parametrize("prompt", ["Write a poem about the sea", "How do I bake bread at home?"])
def test_batched_equals_literal(setup, prompt):
    model, saes, cands = setup
    calls = []

    def p_fn(ablated):
        calls.append(ablated)
        plans = [FeatureSet(ablated).plan()] if ablated else None
        return refusal_probs(model, saes, [prompt], plans=plans).item()

    traces = batched_traces(model, saes, prompt, cands, 5, seeds=[0, 1, 2], batch_size=16)
    assert {len(t.blocks) for t in traces} == {9}  # floor(47 / 5) blocks, 2 left unvisited
    nonempty = 0
    for tau in TAUS:
        for trace in traces:
            literal = literal_algorithm1(p_fn, cands, 5, tau, trace.seed)
            assert literal == trace.selected(tau), (tau, trace.seed)
            nonempty += bool(literal)
    assert 0 < nonempty < len(TAUS) * 3  # the thresholds actually discriminate
    assert len(calls) == 2 * 9 * len(TAUS) * 3  # literal: two P per step, every (τ, seed)


def test_blocks_are_decision_independent():
    cands = [(0, i) for i in range(23)]
    blocks = draw_blocks(cands, 5, seed=7)
    assert len(blocks) == 4 and len({f for b in blocks for f in b}) == 20
    sts = states(cands, blocks)
    assert len(sts[0]) == 23 and len(sts[-1]) == 3
    assert draw_blocks(cands, 5, seed=7) == blocks and draw_blocks(cands, 5, seed=8) != blocks
    # every τ's literal run follows the same blocks: accepting all or none gives the block union / ∅
    assert literal_algorithm1(lambda a: 1.0 + len(a), cands, 5, 0.0, 7) == {f for b in blocks for f in b}
    assert literal_algorithm1(lambda a: 1.0, cands, 5, 0.5, 7) == set()


def test_consensus_keeps_only_latents_every_seed_selects():
    cands = [(0, i) for i in range(20)]
    # seed 0 accepts its first block only (Δ = 0.5 there, 0 elsewhere); seed 1 its first two
    t0 = Algorithm1Trace(0, draw_blocks(cands, 5, 0), [1.0, 0.5, 0.5, 0.5, 0.5])
    t1 = Algorithm1Trace(1, draw_blocks(cands, 5, 1), [1.0, 0.5, 0.25, 0.25, 0.25])
    assert t0.selected(0.3) == set(t0.blocks[0]) and t1.selected(0.3) == set(t1.blocks[0] + t1.blocks[1])
    both = set(t0.blocks[0]) & set(t1.blocks[0] + t1.blocks[1])
    assert consensus([t0, t1], 0.3) == both and both != set(t0.blocks[0])  # seed 1 vetoes some
    assert consensus([t0, t1], 0.6) == set() and consensus([t0], 0.3) == set(t0.blocks[0])
    assert consensus([], 0.3) == set()


def test_delta_and_pass_counts():
    assert delta(0.5, 0.25) == 0.5 and delta(0.0, 0.0) == 0.0 and delta(0.0, 0.1) == float("inf")
    fp = forward_passes(200, 5, 3, 8, 32)
    assert fp["literal_sequential"] == 2 * 40 * 8 * 3 and fp["batched_rows"] == 3 * 41
    assert fp["batched_sequential"] == 4


def test_shard_batching_across_prompts_equals_literal_per_prompt(setup):
    """States of several prompts (different lengths and pools) share forward passes whose rows mix
    prompts; each prompt still gets exactly the literal Algorithm 1's sets, and `minimal_sets`
    over the shard gives each prompt the record `minimal_set` gives it alone."""
    model, saes, cands = setup
    items = [("Write a poem about the sea", cands[:22]), ("How do I bake bread at home, step by step?", cands[10:31]),
             ("Hi", cands[25:])]
    shard = shard_traces(model, saes, items, 5, seeds=[0, 1], batch_size=7)  # 7-row passes straddle prompts
    nonempty = total = 0
    for (prompt, pool), traces in zip(items, shard):
        assert [len(t.blocks) for t in traces] == [len(pool) // 5] * 2
        p_fn = lambda ablated, prompt=prompt: refusal_probs(  # noqa: E731
            model, saes, [prompt], plans=[FeatureSet(ablated).plan()] if ablated else None).item()
        for tau in (0.05, 0.2, 0.8):
            for trace in traces:
                literal = literal_algorithm1(p_fn, pool, 5, tau, trace.seed)
                assert literal == trace.selected(tau), (prompt, tau, trace.seed)
                nonempty, total = nonempty + bool(literal), total + 1
    assert 0 < nonempty < total
    judge = make_judge("first-token", degenerate_is_jailbreak=True, threshold=0.5)
    kw = dict(block_size=5, taus=[0.05, 0.2], seeds=[0, 1], batch_size=7, max_new_tokens=2)
    together = minimal_sets(model, saes, [(f"p{i}", t, c) for i, (t, c) in enumerate(items)], judge, **kw)
    for i, (text, pool) in enumerate(items):
        a, b = together[i].to_json(), minimal_set(model, saes, f"p{i}", text, pool, judge, **kw).to_json()
        da, db = a.pop("deltas"), b.pop("deltas")  # rows batched with other prompts: float noise only
        assert a == b and da.keys() == db.keys()
        for seed in da:
            assert da[seed] == pytest.approx(db[seed], abs=1e-5)
