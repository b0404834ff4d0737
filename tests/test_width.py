"""The analyses' width-safe paths (chunked, sparse, lazy) equal the plain computations they
replace, on the planted tiny world: chunk sizes small enough that every chunk boundary is
crossed, references written out in full here."""

import random

import pytest
import torch
from planted import HARMFUL, planted_world

from refusalscope.interventions.features import Feature, FeatureSet
from refusalscope.methods import dashboards
from refusalscope.methods.activity import token_counts
from refusalscope.methods.controls import random_sets
from refusalscope.methods.latent_weights import decoder_cosines, fm_neighbours, logit_effects
from refusalscope.methods.taxonomy import LatentPool, layer_features


@pytest.fixture(scope="module")
def w():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield planted_world()
    torch.set_num_threads(threads)


FEATS = FeatureSet([(1, 0), (1, 7), (1, 100), (2, 3), (2, 64), (2, 127), (3, 1), (3, 50)])


def test_logit_effects_in_chunks_equal_the_dense_product(w):
    model, saes = w
    W_U = model.hf.get_output_embeddings().weight.detach().float()
    got = logit_effects(model, saes, FEATS, k=5, chunk=3)
    assert set(got) == set(FEATS)
    for f in FEATS:
        eff = saes[f.layer].W_dec[f.index].float() @ W_U.T
        top, bot = eff.topk(5), (-eff).topk(5)
        assert [v for _, v in got[f][0]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [v for _, v in got[f][1]] == pytest.approx((-bot.values).tolist(), abs=1e-4)
        assert [t for t, _ in got[f][0]] == [model.tokenizer.decode([int(i)]) for i in top.indices]


def test_decoder_cosines_in_chunks(w):
    model, saes = w
    r = torch.randn(saes[1].d_in, generator=torch.Generator().manual_seed(3))
    got = decoder_cosines(saes, FEATS, r, chunk=2)
    for f in FEATS:
        v = saes[f.layer].W_dec[f.index]
        assert got[f] == pytest.approx(float(v @ r / (v.norm() * r.norm())), abs=1e-4)


def test_fm_neighbours_in_chunks_equal_one_by_one():
    V = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    cols = [f"{1 + j % 3}-{j}" for j in range(40)]
    asked = cols[::3] + ["9-9"]
    got = fm_neighbours(V, cols, asked, k=4, chunk=5)
    U = V / V.norm(dim=1, keepdim=True)
    assert set(got) == {Feature.of(c) for c in cols[::3]}
    for c in cols[::3]:
        j = cols.index(c)
        sims = U @ U[j]
        sims[j] = -2
        assert [n for n, _ in got[Feature.of(c)]] == [cols[int(i)] for i in sims.topk(4).indices]


def test_token_counts_in_row_slices_equal_one_encode(w):
    model, saes = w
    whole = token_counts(model, saes, HARMFUL, batch_size=4)
    sliced = token_counts(model, saes, HARMFUL, batch_size=4, max_elements=1)  # one row at a time
    assert whole == sliced
    batch = model.encode(HARMFUL)
    res = model.residuals(batch, [2])[2]
    on = ((saes[2].encode(res) > 0) & batch.attention_mask.bool()[..., None]).sum(1)
    for r in range(len(HARMFUL)):
        assert whole[r][2] == {i: int(n) for i, n in enumerate(on[r].tolist()) if n > 0}


def _random_sets_reference(sets, active, seed):
    """The per-layer scan the vectorised draw replaced (kept here as the reference)."""
    out = {}
    for pid, own in sets.items():
        own = FeatureSet(own)
        need = {}
        for l, _ in own:
            need[l] = need.get(l, 0) + 1
        rng = random.Random(f"{seed}/{pid}")
        picked, short = [], False
        for layer in sorted(need):
            pool = sorted(set(int(i) for i in active[pid].get(layer, ())) - {i for l, i in own if l == layer})
            k = min(need[layer], len(pool))
            short |= k < need[layer]
            picked += [Feature(layer, i) for i in sorted(rng.sample(pool, k))]
        out[pid] = {"features": FeatureSet(picked), "short": short}
    return out


def test_random_sets_draw_exactly_as_the_per_layer_scan():
    g = random.Random(1)
    active = {f"p{j}": {l: g.sample(range(500), 60) for l in (1, 2, 5)} for j in range(6)}
    sets = {pid: [(l, i) for l in (1, 2) for i in a[l][:7]] + [(5, 499), (3, 1)] for pid, a in active.items()}
    for seed in (0, 1, 2):
        assert random_sets(sets, active, seed) == _random_sets_reference(sets, active, seed)
    assert all(d["short"] for d in random_sets(sets, active, 0).values())  # layer 3 has no pool


def test_latent_pool_draws_as_the_list_it_replaces(w):
    _, saes = w
    exclude = ["0-0", "1-5", "1-6", "3-127", "2-64"]
    pool = LatentPool(saes, exclude)
    listed = [f for f in layer_features(saes) if f not in set(exclude)]
    assert len(pool) == len(listed) and list(pool) == listed
    for seed in (0, 7):
        assert random.Random(seed).sample(pool, 50) == random.Random(seed).sample(listed, 50)


def test_corpus_dashboards_do_not_depend_on_the_column_chunk(w, monkeypatch):
    model, saes = w
    texts = [model.format_chat(t) for t in HARMFUL]
    kw = {"batch_size": 3, "top_k": 3, "seed": 0}
    whole = dashboards.corpus_dashboards(model, saes, texts, FEATS, **kw)
    monkeypatch.setattr(dashboards, "COLS", 2)
    chunked = dashboards.corpus_dashboards(model, saes, texts, FEATS, **kw)
    for f in FEATS:
        a, b = whole[f], chunked[f]
        assert {k: v for k, v in a.items() if k not in ("top", "quantiles", "histogram")} == \
               {k: v for k, v in b.items() if k not in ("top", "quantiles", "histogram")}
        assert [(x.text, x.position, x.tokens) for x in a["top"]] == [(x.text, x.position, x.tokens) for x in b["top"]]
        assert [x.value for x in a["top"]] == pytest.approx([x.value for x in b["top"]], abs=1e-5)
        assert a["histogram"]["counts"] == b["histogram"]["counts"]
