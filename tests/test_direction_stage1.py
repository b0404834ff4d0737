"""Refusal direction and Stage 1 on the planted tiny world (see planted.py)."""

import pytest
import torch
from planted import HARMFUL, HARMLESS, planted_world

from refusalscope.interventions.spec import ActAdd, DirectionAblation
from refusalscope.measures.judges import make_judge
from refusalscope.methods.direction import (
    candidate_layers,
    cosine_profile,
    mean_differences,
    score_candidates,
    select_direction,
)
from refusalscope.methods.evaluate import generate_judged, refusal_probs
from refusalscope.methods.stage1 import aligned_latents, ladder, search_k, top_k_set


@pytest.fixture(scope="module")
def world():
    model, saes = planted_world()
    p = refusal_probs(model, None, HARMFUL).sort().values
    judge = make_judge("first-token", degenerate_is_jailbreak=True, threshold=float(p[2]))
    return model, saes, judge


def test_mean_differences_and_direction_effects(world):
    model, saes, judge = world
    diffs = mean_differences(model, HARMFUL, HARMLESS, [-1, -2], batch_size=4)
    assert diffs.shape == (2, model.n_layers, model.d_model)
    res = model.residuals(model.encode(HARMFUL), [2], positions=1)[2][:, -1].mean(0)
    res -= model.residuals(model.encode(HARMLESS), [2], positions=1)[2][:, -1].mean(0)
    torch.testing.assert_close(diffs[0, 2], res, atol=1e-5, rtol=1e-4)
    table = score_candidates(model, diffs, [-1, -2], candidate_layers(model.n_layers, "auto"),
                             HARMFUL, HARMLESS, batch_size=8)
    assert len(table) == 2 * 2 and (table["p_refusal_ablated"] < table["p_refusal_base"]).any()
    choice = select_direction(model, diffs, [-1, -2], table, HARMFUL, HARMLESS, judge, max_kl=100,
                              n_generate=2, max_new_tokens=2, batch_size=8)
    assert sorted(set(table["layer"])) == candidate_layers(model.n_layers, "auto")
    judged = choice.table.dropna(subset=["asr_val"])
    assert len(judged) == 2 and choice.table["selected"].sum() == 1
    chosen = choice.table[choice.table["selected"]].iloc[0]
    assert (choice.layer, choice.position) == (int(chosen["layer"]), int(chosen["position"]))
    assert abs(choice.direction.norm().item() - 1) < 1e-5
    before = refusal_probs(model, None, HARMFUL).mean()
    after = refusal_probs(model, None, HARMFUL, shared=[DirectionAblation(choice.direction)]).mean()
    induced = refusal_probs(model, None, HARMLESS, shared=[ActAdd(choice.vector, choice.layer)]).mean()
    assert after < before and induced > refusal_probs(model, None, HARMLESS).mean()
    cos = cosine_profile(model, HARMFUL, choice.direction, batch_size=8)
    assert cos.shape == (8, model.n_layers)


def test_selection_takes_the_planted_direction_over_a_random_one_with_lower_kl(world):
    """The rule on a planted contrast, checked by hand: the real mean difference (layer 2) jailbreaks
    every harmful prompt; a random vector of the same norm put in as layer 1's candidate does not, though
    it costs less KL on harmless prompts. ASR decides before KL, so layer 2 is chosen."""
    model, _, judge = world
    diffs = mean_differences(model, HARMFUL, HARMLESS, [-1], batch_size=8)
    g = torch.Generator().manual_seed(0)
    diffs[0, 1] = torch.randn(model.d_model, generator=g) * diffs[0, 1].norm()
    table = score_candidates(model, diffs, [-1], [1, 2], HARMFUL, HARMLESS, batch_size=8)
    choice = select_direction(model, diffs, [-1], table, HARMFUL, HARMLESS, judge, max_kl=100, n_generate=2,
                              max_new_tokens=2, batch_size=8)
    asr = dict(zip(choice.table["layer"], choice.table["asr_val"]))
    kl = dict(zip(choice.table["layer"], choice.table["kl_harmless"]))
    assert asr[2] == 1.0 > asr[1] and kl[1] < kl[2]
    assert choice.layer == 2 and choice.table["selected"].tolist() == [False, True]
    torch.testing.assert_close(choice.direction, diffs[0, 2] / diffs[0, 2].norm())


def test_aligned_latents_rank_planted_first(world):
    model, saes, _ = world
    diffs = mean_differences(model, HARMFUL, HARMLESS, [-1], batch_size=8)
    r = diffs[0, 2] / diffs[0, 2].norm()
    ranked, cos = aligned_latents(saes, r, [1, 2, 3], k_max=5)
    assert set(ranked[2][:3].tolist()) == {0, 1, 2} and cos[2][0] > 0.99
    assert all((c[:-1] >= c[1:]).all() for c in cos.values())  # descending
    top2 = top_k_set(ranked, 2).by_layer()  # two per layer; at layer 2, two of the three planted latents
    assert sorted(top2) == [1, 2, 3] and all(len(ix) == 2 for ix in top2.values()) and set(top2[2]) < {0, 1, 2}


def test_batched_ladder_equals_sequential(world):
    model, saes, judge = world
    diffs = mean_differences(model, HARMFUL, HARMLESS, [-1], batch_size=8)
    ranked, _ = aligned_latents(saes, diffs[0, 2], [1, 2, 3], k_max=6)
    ks = ladder(1, 1, 6)
    prompts = [(f"p{i}", t) for i, t in enumerate(HARMFUL)]
    batched = search_k(model, saes, prompts, ranked, ks, judge, 2, 16, rungs_per_round=4, quiet=True)
    for (pid, text), res in zip(prompts, batched):
        seq = None
        for k in ks:  # the paper's loop: grow K until the ablation jailbreaks
            j = generate_judged(model, saes, [text], [top_k_set(ranked, k).plan()], judge, 2, 16)
            if j.jailbroken[0]:
                seq = k
                break
        assert res.k == seq, pid
    assert sum(r.k is not None for r in batched) >= 3
