"""Stage 3: the sparse activation matrix, the FM (eq. 2 via the O(kd) identity) against a linear
probe on a planted interaction, the embedding ranking, and the batched K ladder against the
sequential loop on the planted tiny world (see planted.py)."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from planted import HARMFUL, HARMLESS, planted_world

from refusalscope.errors import UserError
from refusalscope.measures.judges import make_judge
from refusalscope.methods.evaluate import generate_judged, refusal_probs
from refusalscope.methods.fm import (
    FactorizationMachine,
    embedding_collapse,
    rank_by_embedding_similarity,
    rank_per_prompt,
    train_fm,
)
from refusalscope.methods.fm_data import (
    FeatureMatrix,
    Split,
    collect_sae_activations,
    csr_to_torch,
    fm_dataset,
    max_abs_scale,
)
from refusalscope.methods.probe import rank_by_weight, train_probe
from refusalscope.methods.stage3 import combined_plan, probe_sweep, stage3_search

LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def world():
    model, saes = planted_world()
    p = refusal_probs(model, None, HARMFUL).sort().values
    judge = make_judge("first-token", degenerate_is_jailbreak=True, threshold=float(p[2]))
    return model, saes, judge


@pytest.fixture(scope="module")
def acts(world):
    model, saes, _ = world
    return {(name, mode): collect_sae_activations(model, saes, ps, LAYERS, n_tokens=4, batch_size=3, mode=mode)
            for name, ps, modes in (("harmful", HARMFUL, ("pooled", "tokens")), ("harmless", HARMLESS, ("tokens",)))
            for mode in modes}


def test_feature_matrix_equals_dense(world, acts, tmp_path):
    model, saes, _ = world
    res = model.residuals(model.encode(HARMFUL), LAYERS, positions=4)  # one batch, no chunking
    dense = torch.cat([saes[l].encode(res[l]) for l in LAYERS], -1)  # [8, 4, 4 * 128]
    all_cols = [(l, i) for l in LAYERS for i in range(saes[l].d_sae)]
    for mode, want in (("pooled", dense.amax(1)), ("tokens", dense.reshape(-1, dense.shape[-1]))):
        fm = acts["harmful", mode]
        used = (want != 0).any(0)
        assert 0 < used.sum() < len(all_cols)  # some latents never fire: their columns are dropped
        assert fm.columns == [c for c, u in zip(all_cols, used.tolist()) if u]
        torch.testing.assert_close(torch.from_numpy(fm.values.toarray()), want[:, used], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fm.to_torch_sparse().to_dense(), torch.from_numpy(fm.values.toarray()))
        assert fm.column_labels()[0] == f"{fm.columns[0][0]}-{fm.columns[0][1]}"
        assert fm.column_of[fm.columns[5]] == 5
        rows = fm.rows.tolist()
        assert rows == ([[p, -1] for p in range(8)] if mode == "pooled"
                        else [[p, j] for p in range(8) for j in range(4)])
        back = FeatureMatrix.load(fm.save(tmp_path / f"{mode}.safetensors"))
        assert back.columns == fm.columns and back.mode == mode and back.n_tokens == 4
        assert (back.values != fm.values).nnz == 0 and (back.rows == fm.rows).all()
    with pytest.raises(UserError):
        collect_sae_activations(model, saes, HARMFUL[:1], [7])
    # pooling a per-token matrix gives what the pooled collection records
    pooled, tokens = acts["harmful", "pooled"], acts["harmful", "tokens"].pooled()
    assert tokens.columns == pooled.columns and tokens.mode == "pooled" and (tokens.rows == pooled.rows).all()
    np.testing.assert_allclose(tokens.values.toarray(), pooled.values.toarray(), atol=1e-6)


def test_split_is_by_prompt_and_seeded(acts):
    h, s = acts["harmful", "tokens"], acts["harmless", "tokens"]
    ds = fm_dataset(h, s, seed=0)
    union = sorted(set(h.columns) | set(s.columns))
    in_train = {ds.columns[j] for j in np.unique(ds.train.X.indices)}
    assert ds.columns == sorted(in_train) and ds.n_seen == len(union)  # columns: latents some train row has
    np.testing.assert_array_equal(ds.support, (ds.train.X != 0).sum(0).A1)
    seen = {}
    for name in ("train", "val", "test"):
        split = getattr(ds, name)
        assert (split.y == split.rows[:, 0]).all()
        for label, p, _ in split.rows.tolist():
            assert seen.setdefault((label, p), name) == name  # every row of a prompt in one split
    assert len(seen) == 16 and [len(getattr(ds, n)) for n in ("train", "val", "test")] == [48, 8, 8]
    src = {1: h, 0: s}
    for r in range(len(ds.train)):  # rows are the original rows re-indexed onto the union columns
        label, p, pos = ds.train.rows[r]
        orig = src[label]
        j = int(np.flatnonzero((orig.rows[:, 0] == p) & (orig.rows[:, 1] == pos))[0])
        full = dict(zip(orig.columns, orig.values[j].toarray().ravel()))
        want = np.array([full.get(c, 0.0) for c in ds.columns], np.float32)
        np.testing.assert_array_equal(ds.train.X[r].toarray().ravel(), want)
    again, other = fm_dataset(h, s, seed=0), fm_dataset(h, s, seed=1)
    assert (again.test.rows == ds.test.rows).all() and (again.train.X != ds.train.X).nnz == 0
    assert (other.test.rows != ds.test.rows).any()
    with pytest.raises(UserError):
        fm_dataset(h, s, seed=0, fractions=(0.5, 0.1, 0.1))


def test_fm_forward_equals_naive_pairwise_sum():
    g = torch.Generator().manual_seed(0)
    fm = FactorizationMachine(30, k=5, init_std=0.5, generator=g)
    with torch.no_grad():
        fm.w.copy_(torch.randn(30, generator=g))
        fm.w0.fill_(0.3)
    X = sp.random(7, 30, density=0.2, format="csr", random_state=1, dtype=np.float32)
    X.data = X.data * 4 - 2  # signed values
    dense = torch.from_numpy(X.toarray())
    naive = []
    for x in dense:
        y = fm.w0 + fm.w @ x
        for i, j in itertools.combinations(range(30), 2):
            y = y + (fm.V[i] @ fm.V[j]) * x[i] * x[j]
        naive.append(y)
    naive = torch.stack(naive).detach()
    with torch.no_grad():
        torch.testing.assert_close(fm(csr_to_torch(X)), naive, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fm(dense), naive, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fm(dense.to_sparse_csr()), naive, atol=1e-4, rtol=1e-4)


def interaction_split(n: int, seed: int, d: int = 60) -> Split:
    """y = [x_a · x_b > 0] for two always-present signed features plus 6 random non-negative
    distractors per row: XOR in the (x_a, x_b) quadrants, so no linear model beats chance."""
    rng = np.random.default_rng(seed)
    xa, xb = rng.uniform(-50, 50, n), rng.uniform(-50, 50, n)
    rows, cols, vals = [], [], []
    for r in range(n):
        other = rng.choice(np.arange(2, d), 6, replace=False)
        rows += [r] * 8
        cols += [0, 1, *other]
        vals += [xa[r], xb[r], *rng.uniform(0, 100, 6)]
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n, d), dtype=np.float32)
    return Split(X, (xa * xb > 0).astype(np.float32), np.zeros((n, 3), np.int64))


@pytest.fixture(scope="module")
def synthetic():
    tr, va, te = interaction_split(600, 0), interaction_split(150, 1), interaction_split(300, 2)
    return tr, va, te, train_fm(tr, va, te, k=20, lr=1e-2, epochs=10, seed=0)


def test_fm_learns_interaction_probe_does_not(synthetic):
    tr, va, te, fm = synthetic
    probe = train_probe(tr, te, va, seed=0)
    assert fm.test_acc > 0.8 and probe.test_acc < 0.65
    assert fm.test_acc > probe.test_acc + 0.2
    np.testing.assert_array_equal(fm.scale, max_abs_scale(tr.X))
    ranked = rank_by_weight(probe, [(0, i) for i in range(60)], exclude={(0, 0)})
    assert (0, 0) not in dict(ranked) and len(ranked) == 59
    assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))


def test_training_is_seeded_and_returns_best_val_epoch(synthetic):
    tr, va, te, fm = synthetic
    keys = [(h["val_acc"], -h["val_loss"]) for h in fm.history]
    assert len(fm.history) == 10 and fm.best_epoch == keys.index(max(keys))
    assert fm.val_acc == fm.history[fm.best_epoch]["val_acc"] == fm.accuracy(va)
    # the same seed stopped right after the best epoch ends with exactly the returned weights
    short = train_fm(tr, va, k=20, lr=1e-2, epochs=fm.best_epoch + 1, seed=0)
    for a, b in zip(short.model.parameters(), fm.model.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert short.history == fm.history[:fm.best_epoch + 1]


def test_rank_by_embedding_similarity():
    fm = FactorizationMachine(6, k=3)
    V = torch.tensor([[1., 0, 0], [0, 1, 0], [1, 1, 0], [-1, -1, 0], [0.9, 0.1, 0], [0, 0, 1]])
    with torch.no_grad():
        fm.V.copy_(V)
    cols = [(1, i) for i in range(6)]
    stage2 = {(1, 0), (1, 1), (5, 9)}  # (5, 9) is no FM column: ignored
    U = V / V.norm(dim=1, keepdim=True)
    ranked = rank_by_embedding_similarity(fm, cols, stage2, aggregate="max")
    assert [f for f, _ in ranked] == [(1, 4), (1, 2), (1, 5), (1, 3)]
    for f, score in ranked:  # max cosine to the Stage 2 embeddings
        assert score == pytest.approx(max(float(U[f[1]] @ U[a]) for a in (0, 1)), abs=1e-6)
    mean = rank_by_embedding_similarity(fm, cols, stage2, aggregate="mean")
    assert [f for f, _ in mean] == [(1, 2), (1, 4), (1, 5), (1, 3)]
    assert mean[0][1] == pytest.approx(float(U[2] @ (U[0] + U[1]) / 2), abs=1e-6)
    assert len(rank_by_embedding_similarity(fm, cols, stage2, exclude=set(), chunk=2)) == 6
    with pytest.raises(UserError):
        rank_by_embedding_similarity(fm, cols, {(2, 0)})


def test_rank_per_prompt_is_each_prompts_own_global_ranking():
    g = torch.Generator().manual_seed(0)
    fm = FactorizationMachine(40, k=5, generator=g)
    with torch.no_grad():
        fm.V.copy_(torch.randn(40, 5, generator=g))
    cols = [(2, i) for i in range(40)]
    sets = {"a": [(2, 0), (2, 1)], "b": [(2, 7), (9, 9)], "c": [(9, 9)]}  # (9, 9) is no column
    for agg in ("mean", "max"):
        per = rank_per_prompt(fm, cols, sets, top=10, aggregate=agg)
        for pid in ("a", "b"):  # = the global ranking with this prompt's set as the only anchors
            own = rank_by_embedding_similarity(fm, cols, sets[pid], aggregate=agg)[:10]
            assert [f for f, _ in per[pid]] == [f for f, _ in own] and len(per[pid]) == 10
            assert not {f for f, _ in per[pid]} & set(map(tuple, sets[pid]))
        assert per["c"] == []  # no anchor among the FM columns: the caller falls back
        assert [f for f, _ in per["a"]] != [f for f, _ in per["b"]]
    with pytest.raises(UserError):
        rank_per_prompt(fm, cols, sets, top=3, aggregate="median")


def test_global_max_saturates_with_many_anchors_per_prompt_mean_does_not():
    """The issue's point: with thousands of anchors, the max cosine to their union is near 1 for
    almost every latent, so a global max ranking barely separates latents."""
    g = torch.Generator().manual_seed(1)
    fm = FactorizationMachine(3000, k=8, generator=g)
    with torch.no_grad():
        fm.V.copy_(torch.randn(3000, 8, generator=g))
    cols = [(3, i) for i in range(3000)]
    union = cols[:2000]
    top = rank_by_embedding_similarity(fm, cols, union, aggregate="max")
    spread_max = top[0][1] - top[len(top) // 2][1]
    per = rank_per_prompt(fm, cols, {"p": cols[:5]}, top=1000, aggregate="mean")["p"]
    spread_mean = per[0][1] - per[len(top) // 2][1]
    assert top[len(top) // 2][1] > 0.8 and spread_max < 0.2 < spread_mean


def test_prompt_accuracy_averages_a_prompts_token_rows(synthetic):
    train, val, test, fm = synthetic
    label = test.y.astype(np.int64)
    rows = np.column_stack([label, np.arange(len(test)) // 2, np.zeros(len(test), dtype=np.int64)])
    split = Split(test.X, test.y, rows)  # pretend every two consecutive rows are one prompt's tokens
    logits = fm.logits(test.X)
    want = []
    for key in np.unique(rows[:, :2], axis=0):
        sel = (rows[:, 0] == key[0]) & (rows[:, 1] == key[1])
        want.append((logits[sel].mean() > 0) == (key[0] > 0.5))
    assert fm.prompt_accuracy(split) == pytest.approx(float(np.mean(want)))


def test_unscaled_training_uses_raw_inputs(synthetic):
    train, val, test, _ = synthetic
    raw = train_fm(train, val, test, k=4, epochs=2, seed=0, scale="none")
    assert np.all(raw.scale == 1.0)
    with pytest.raises(UserError):
        train_fm(train, val, test, k=4, epochs=1, scale="zscore")
    k50 = train_fm(train, val, None, k=50, epochs=1, seed=0)  # the paper's largest size trains
    assert k50.model.k == 50 and np.isfinite(k50.history[0]["loss"])


def test_embedding_collapse(synthetic):
    *_, fm = synthetic
    U = fm.model.V.detach() / fm.model.V.detach().norm(dim=1, keepdim=True)
    C = U @ U.T
    naive = (C.sum() - C.diagonal().sum()) / (len(U) * (len(U) - 1))
    assert embedding_collapse(fm) == pytest.approx(float(naive), abs=1e-5)
    assert -1 <= embedding_collapse(fm) <= 1
    same = FactorizationMachine(50, k=4)
    with torch.no_grad():
        same.V.copy_(torch.ones(50, 4) * torch.rand(50, 1))
    assert embedding_collapse(same) == pytest.approx(1.0)
    assert embedding_collapse(fm, max_n=10, seed=3) == embedding_collapse(fm, max_n=10, seed=3)


def test_stage3_ladder_equals_sequential_loop(world):
    model, saes, judge = world
    prompts = [(f"p{i}", t) for i, t in enumerate(HARMFUL)]
    active = {pid: [(0, 0)] for pid, _ in prompts}  # one planted latent as the "Stage 2" set
    ranked = [(3, 50), (1, 0), (2, 77), (2, 0), (0, 5), (3, 0), (1, 1)]  # planted latents 0-2
    ks = list(range(1, 8))
    done = []
    res = stage3_search(model, saes, prompts, active, [(f, 1.0) for f in ranked], ks, judge=judge,
                        max_new_tokens=1, batch_size=16, rungs_per_round=3, on_done=done.append)
    assert sorted(r.id for r in done) == sorted(pid for pid, _ in prompts)
    for (pid, text), r in zip(prompts, res):
        seq = None
        for k in ks:  # grow K until ablating Stage 2 ∪ top-K jailbreaks
            if generate_judged(model, saes, [text], [combined_plan(active[pid], ranked, k)], judge, 1, 16).jailbroken[
                0
            ]:
                seq = k
                break
        assert r.k == seq, pid
    assert len({r.k for r in res}) >= 2  # the prompts break at different K

    sweep = probe_sweep(model, saes, prompts[:4], active, ranked[::-1], ranked, ks=(1, 4), judge=judge,
                        max_new_tokens=1, batch_size=16, rows_per_call=6)
    table = sweep.counts()
    assert list(table["k"]) == ["1", "4", "any"] and set(table.columns) == {"k", "probe", "fm"}
    for p, r in enumerate(res[:4]):  # the FM column agrees with the ladder's verdicts
        for j, k in enumerate((1, 4)):
            if k in r.verdicts:
                assert sweep.jailbroken["fm"][p, j] == r.verdicts[k].jailbroken
