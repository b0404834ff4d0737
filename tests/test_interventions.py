"""The hook manager: sparse feature ablation equals the full-SAE reference, per-row plans equal
separate runs, and direction ablation / ActAdd / clamping do what they say."""

import pytest
import torch
from sae_fixtures import sae_set
from tiny import tiny_gemma2, tiny_llama

from refusalscope.errors import UserError
from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import ActAdd, DirectionAblation, FeatureAblation, FeatureClamp, Recording
from refusalscope.io.model import ChatModel

PROMPTS = ["Write a poem", "How do I bake bread at home? Explain the steps please.", "Hi"]
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def llama():
    return ChatModel(*tiny_llama(), name="llama")


def _ablation(saes, n=20, positions="all"):
    return FeatureAblation({l: list(range(0, 2 * n, 2)) for l in saes.keys()}, positions)


@pytest.mark.parametrize("kind", ["jumprelu", "topk", "relu", "gemmascope", "llamascope"])
def test_sparse_equals_reference(llama, kind, tmp_path):
    saes = sae_set(kind, LAYERS, tmp_path=tmp_path)
    batch = llama.encode(PROMPTS)
    abl = _ablation(saes)
    with intervene(llama, saes, [abl], mode="sparse"):
        sparse = llama.logits(batch, last=None)
    with intervene(llama, saes, [abl], mode="reference"):
        ref = llama.logits(batch, last=None)
    base = llama.logits(batch, last=None)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(sparse[real], ref[real], atol=2e-4, rtol=2e-4)
    assert (sparse[real] - base[real]).abs().max() > 1e-3  # the ablation did something


def test_sparse_equals_reference_during_generation(llama):
    saes = sae_set("jumprelu", LAYERS)
    batch = llama.encode(PROMPTS)
    outs = {}
    for mode in ("sparse", "reference"):
        with intervene(llama, saes, [_ablation(saes)], mode=mode):
            outs[mode] = llama.generate(batch, max_new_tokens=8)
    assert outs["sparse"] == outs["reference"]


def test_gemma2_sparse_equals_reference():
    model = ChatModel(*tiny_gemma2(), name="gemma")
    saes = sae_set("jumprelu", LAYERS)
    batch = model.encode(PROMPTS)
    with intervene(model, saes, [_ablation(saes)]):
        a = model.logits(batch)
    with intervene(model, saes, [_ablation(saes)], mode="reference"):
        b = model.logits(batch)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_per_row_plans_equal_separate_runs(llama):
    saes = sae_set("jumprelu", LAYERS)
    plans = [[FeatureAblation({0: [1, 2, 3]})], [], [FeatureAblation({1: [5], 2: list(range(30))})],
             [DirectionAblation(torch.randn(64))]]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    batch = llama.encode(prompts)
    with intervene(llama, saes, rows=plans):
        together = llama.logits(batch, batch_size=3)  # chunks: rows are counted across chunks
    for i, (p, plan) in enumerate(zip(prompts, plans)):
        with intervene(llama, saes, plan):
            alone = llama.logits(llama.encode([p]))
        torch.testing.assert_close(together[i], alone[0], atol=2e-4, rtol=2e-4)


def test_positions_prompt_vs_generated_and_bos(llama):
    saes = sae_set("jumprelu", LAYERS)
    batch = llama.encode(PROMPTS[:2])
    base = llama.logits(batch, last=None)
    with intervene(llama, saes, [_ablation(saes, positions="generated")]):
        gen_only = llama.logits(batch, last=None)
    torch.testing.assert_close(gen_only, base)  # a plain forward has no generated tokens
    with intervene(llama, saes, [_ablation(saes, positions=(0,))]):
        bos = llama.logits(batch, last=None)
    first = (batch.attention_mask == 0).sum(1)
    for r in range(2):
        assert (bos[r, first[r]] - base[r, first[r]]).abs().max() > 1e-4  # BOS itself changed
    rec = Recording({1: [0, 2, 4]})
    with intervene(llama, saes, [_ablation(saes, positions="prompt")], record=rec):
        llama.generate(batch, max_new_tokens=3)
    assert [st["prompt"] for st in rec.steps] == [True, False, False]


def test_clamp_sets_latent_value(llama):
    saes = sae_set("jumprelu", LAYERS)
    batch = llama.encode(PROMPTS[:2])
    rec = Recording({1: [7]})
    with intervene(llama, saes, [FeatureClamp({0: {7: 0.0}}, positions="all")], record=rec):
        clamped_zero = llama.logits(batch, last=None)
    with intervene(llama, saes, [FeatureAblation({0: [7]})]):
        ablated = llama.logits(batch, last=None)
    torch.testing.assert_close(clamped_zero, ablated, atol=1e-5, rtol=1e-5)  # clamp to 0 == ablate
    # clamping to a positive value at BOS only: sparse path equals the full-SAE reference
    with intervene(llama, saes, [FeatureClamp({1: {7: 5.0}}, positions=(0,))], mode="reference"):
        ref = llama.logits(batch)
    with intervene(llama, saes, [FeatureClamp({1: {7: 5.0}}, positions=(0,))]):
        sp = llama.logits(batch)
    torch.testing.assert_close(sp, ref, atol=2e-4, rtol=2e-4)
    assert (sp - llama.logits(batch)).abs().max() > 1e-4


def test_direction_ablation_removes_component_and_actadd_adds(llama):
    r = torch.randn(64)
    r_hat = r / r.norm()
    batch = llama.encode(PROMPTS)
    with intervene(llama, None, [DirectionAblation(r)]):
        res = llama.residuals(batch, [0, 2])
    real = batch.attention_mask.bool()
    for layer in (0, 2):
        assert (res[layer][real] @ r_hat).abs().max() < 1e-4
    base = llama.residuals(batch, [1])[1]
    with intervene(llama, None, [ActAdd(3 * r_hat, layer=1)]):
        added = llama.residuals(batch, [1])[1]
    torch.testing.assert_close(added[real] - base[real], (3 * r_hat).expand(int(real.sum()), -1),
                               atol=1e-4, rtol=1e-4)
    with intervene(llama, None, [ActAdd(3 * r_hat, layer=1), DirectionAblation(r)]):  # several chunks
        chunked = llama.logits(batch, batch_size=1)
        whole = llama.logits(batch)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


def test_recording_sees_upstream_ablation(llama):
    saes = sae_set("relu", LAYERS)
    batch = llama.encode(PROMPTS)
    ids = list(range(40))
    base_rec, abl_rec = Recording({2: ids}), Recording({2: ids})
    with intervene(llama, saes, record=base_rec):
        llama.logits(batch)
    with intervene(llama, saes, [FeatureAblation({0: list(range(60))})], record=abl_rec):
        llama.logits(batch)
    a = base_rec.max_activation(len(PROMPTS))[2]
    b = abl_rec.max_activation(len(PROMPTS))[2]
    assert a.shape == (3, 40) and (a - b).abs().max() > 1e-4
    full = saes[2].encode(llama.residuals(batch, [2])[2])[..., :40]
    real = batch.attention_mask.bool().unsqueeze(-1)
    torch.testing.assert_close(a, torch.where(real, full, 0).amax(1), atol=1e-5, rtol=1e-5)


def test_bad_feature_and_layer_are_clear_errors(llama):
    saes = sae_set("jumprelu", [0])
    with pytest.raises(UserError, match="no SAE loaded for layer 2"):
        with intervene(llama, saes, [FeatureAblation({2: [1]})]):
            pass
    with pytest.raises(UserError, match="does not exist"):
        with intervene(llama, saes, [FeatureAblation({0: [999]})]):
            pass


def test_row_ablation_arrays_equal_per_row_plans(llama):
    """RowAblations (Stage 2's states as arrays) gives the logits of the same sets as per-row
    FeatureAblation plans, in sparse and reference mode, across batch chunks."""
    import numpy as np

    from refusalscope.interventions.spec import RowAblations

    saes = sae_set("jumprelu", LAYERS)
    batch = llama.encode(PROMPTS * 2)
    sets = [{0: [1, 4], 2: [3]}, {}, {1: [0, 2, 5]}, {0: [4], 1: [2], 2: [3, 7]}, {2: [9]}, {0: [1]}]
    plans = [[FeatureAblation(s)] if s else [] for s in sets]
    table = {l: (np.array([r for r, s in enumerate(sets) for _ in s.get(l, [])]),
                 np.array([i for s in sets for i in s.get(l, [])])) for l in LAYERS}
    for mode in ("sparse", "reference"):
        with intervene(llama, saes, rows=plans, mode=mode):
            want = llama.logits(batch, batch_size=4)
        with intervene(llama, saes, [RowAblations(table)], rows=[[]] * len(sets), mode=mode):
            got = llama.logits(batch, batch_size=4)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - llama.logits(batch)).abs().amax() > 1e-3  # the sets change the logits
    with pytest.raises(UserError):  # a row number past the batch
        with intervene(llama, saes, [RowAblations({0: (np.array([9]), np.array([1]))})], rows=[[]] * 2):
            pass
