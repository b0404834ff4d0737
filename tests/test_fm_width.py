"""Stage 3 at the paper's width: the FM computed from non-zeros only, the lazy Adam checked against
torch's Adam, activations streamed to shard files and read back on resume, FM columns restricted to
latents seen in train rows with a minimum support for the ranking, and an interrupted Stage 3
resumed to the same bytes as an uninterrupted run (on the planted tiny world)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from planted import HARMFUL, planted_world
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.methods import fm_data
from refusalscope.methods.fm import FactorizationMachine, FMResult, rank_by_embedding_similarity, rank_per_prompt
from refusalscope.methods.fm_data import FeatureMatrix, collect_sae_activations, fm_dataset
from refusalscope.methods.fm_sparse import LazyAdam, fm_logits_nnz, nnz_rows, score_rows
from refusalscope.run import stage3 as stage3_run
from refusalscope.run.compare import compare_runs


def test_logits_from_nonzeros_equal_the_dense_fm():
    g = torch.Generator().manual_seed(0)
    fm = FactorizationMachine(40, k=6, init_std=0.5, generator=g)
    with torch.no_grad():
        fm.w.copy_(torch.randn(40, generator=g))
        fm.w0.fill_(-0.2)
    X = sp.random(9, 40, density=0.15, format="csr", random_state=3, dtype=np.float32)
    X.data = X.data * 6 - 3
    X = sp.csr_matrix(sp.diags((np.arange(9) != 4).astype(np.float32)) @ X)  # row 4 has no non-zero: only w0
    X.eliminate_zeros()
    with torch.no_grad():
        dense = fm(torch.from_numpy(X.toarray()))
        torch.testing.assert_close(fm_logits_nnz(fm.w0, fm.w, fm.V, nnz_rows(X, "cpu")), dense, atol=1e-5, rtol=1e-5)
        local = nnz_rows(X, "cpu", local=True)  # columns re-indexed onto the touched ones
        assert local.touched is not None and local.touched.tolist() == sorted(set(X.indices.tolist()))
        out = fm_logits_nnz(fm.w0, fm.w[local.touched], fm.V[local.touched], local)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
        assert out[4].item() == pytest.approx(-0.2)
    torch.testing.assert_close(score_rows(fm.w0, fm.w, fm.V, X), dense, atol=1e-5, rtol=1e-5)


def test_fm_gradients_are_bit_identical_whatever_the_thread_count():
    """A resumed Stage 3 retrains an FM that was cut off and must match the uninterrupted run to
    the bit (the demo kill sweep found 6e-7 differences): the gradient of a batch in which every
    column repeats thousands of times is the same with 1 and 2 threads, every time."""
    X = sp.random(4000, 64, density=0.5, format="csr", random_state=1, dtype=np.float32)
    b = nnz_rows(X, "cpu")

    def grads(threads: int):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            g = torch.Generator().manual_seed(0)
            V = (torch.randn(64, 8, generator=g) * 0.3).requires_grad_()
            w = torch.randn(64, generator=g).requires_grad_()
            fm_logits_nnz(torch.tensor(0.1), w, V, b).sin().sum().backward()
            return torch.cat([V.grad.ravel(), w.grad])
        finally:
            torch.set_num_threads(before)

    one = grads(1)
    for _ in range(4):
        assert torch.equal(grads(2), one)


def test_lazy_adam_is_adam_on_touched_rows_and_leaves_the_rest():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    ref = torch.nn.Parameter(a.clone())
    opt = torch.optim.Adam([ref], lr=0.05)
    lazy_p = a.clone()
    lazy = LazyAdam([lazy_p], lr=0.05)
    for step in range(4):  # every row touched: exactly Adam
        grad = b * (step + 1) - a
        ref.grad = grad.clone()
        opt.step()
        lazy.step([(None, grad.clone())])
    torch.testing.assert_close(lazy_p, ref.detach(), atol=1e-6, rtol=1e-6)
    before, m_before = lazy_p.clone(), lazy.m[0].clone()
    rows = torch.tensor([1, 4])
    lazy.step([(rows, torch.ones(2, 3))])
    untouched = [0, 2, 3, 5]
    assert torch.equal(lazy_p[untouched], before[untouched]) and torch.equal(lazy.m[0][untouched], m_before[untouched])
    assert not torch.equal(lazy_p[rows], before[rows])


@pytest.fixture(scope="module")
def world():
    return planted_world()


def test_activations_stream_to_shard_files_and_resume_from_them(world, tmp_path):
    model, saes = world
    whole = collect_sae_activations(model, saes, HARMFUL, [0, 2, 3], n_tokens=4, batch_size=8, mode="tokens")
    shard = lambda a, b: tmp_path / f"acts-{a}-{b}.safetensors"  # noqa: E731
    streamed = collect_sae_activations(model, saes, HARMFUL, [0, 2, 3], n_tokens=4, batch_size=3, mode="tokens",
                                       shard_file=shard)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts-0-3.safetensors", "acts-3-6.safetensors",
                                                          "acts-6-8.safetensors"]
    for got in (streamed, FeatureMatrix.load(streamed.save(tmp_path / "all.safetensors"))):
        assert got.columns == whole.columns and (got.rows == whole.rows).all()
        np.testing.assert_allclose(got.values.toarray(), whole.values.toarray(), atol=1e-5)
    # a shard file that exists is read, not recomputed: plant a value in one and see it come back
    part = FeatureMatrix.load(shard(3, 6))
    part.values.data[:] = 7.0
    part.save(shard(3, 6))
    again = collect_sae_activations(model, saes, HARMFUL, [0, 2, 3], n_tokens=4, batch_size=3, mode="tokens",
                                    shard_file=shard)
    rows = np.flatnonzero((again.rows[:, 0] >= 3) & (again.rows[:, 0] < 6))
    assert set(again.values[rows].data.tolist()) == {7.0}
    assert (again.values[:12] != streamed.values[:12]).nnz == 0


def _matrix(cells: dict[tuple[int, int], float], columns, n_prompts: int) -> FeatureMatrix:
    """A pooled matrix (one row per prompt) from {(prompt, column position): value}."""
    rows, cols, vals = zip(*[(p, c, v) for (p, c), v in cells.items()])
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n_prompts, len(columns)), dtype=np.float32)
    return FeatureMatrix(columns, X, np.stack([np.arange(n_prompts), np.full(n_prompts, -1)], 1), "pooled", 1)


def test_fm_columns_are_latents_of_train_rows_with_their_support():
    n = 10  # per label: 8 train, 1 val, 1 test prompt
    cols = [(1, 0), (1, 5), (2, 3)]
    h = _matrix({**{(p, 0): 1.0 for p in range(n)}, **{(p, 1): 2.0 for p in range(n)}}, cols, n)
    s = _matrix({(p, 0): 0.5 for p in range(n)}, cols, n)
    ds = fm_dataset(h, s, seed=0)
    assert ds.columns == [(1, 0), (1, 5)] and ds.n_seen == 2  # (2, 3) never fires: not even seen
    assert ds.support.tolist() == [16, 8]  # (1, 0) in every train row, (1, 5) in the harmful ones
    # a latent only a test prompt has is seen but gets no column (no trained embedding)
    test_prompt = int(ds.test.rows[ds.test.rows[:, 0] == 1][0, 1])
    h2 = _matrix({**{(p, 0): 1.0 for p in range(n)}, (test_prompt, 2): 3.0}, cols, n)
    ds2 = fm_dataset(h2, s, seed=0)
    assert ds2.n_seen == 2 and ds2.columns == [(1, 0)] and ds2.test.X.shape[1] == 1


def test_min_support_leaves_rare_latents_out_of_the_ranking_but_not_out_of_the_anchors():
    fm = FactorizationMachine(5, k=2)
    with torch.no_grad():
        fm.V.copy_(torch.tensor([[1.0, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [-1, 0]]))
    cols = [(1, i) for i in range(5)]
    rankable = np.array([False, False, True, True, True])  # (1, 0) and (1, 1) too rarely seen
    top = rank_by_embedding_similarity(fm, cols, [(1, 0)], rankable=rankable)
    assert [f for f, _ in top] == [(1, 2), (1, 3), (1, 4)]  # (1, 0) anchors though it is not rankable
    assert [f for f, _ in rank_by_embedding_similarity(fm, cols, [(1, 0)])][0] == (1, 1)
    per = rank_per_prompt(fm, cols, {"p": [(1, 0)]}, top=2, rankable=rankable)
    assert [f for f, _ in per["p"]] == [(1, 2), (1, 3)]


def test_fm_checkpoint_reads_back_the_same_fit(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(40, 12, density=0.3, format="csr", random_state=0, dtype=np.float32)
    from refusalscope.methods.fm import train_fm
    from refusalscope.methods.fm_data import Split

    split = Split(X, (rng.random(40) > 0.5).astype(np.float32), np.zeros((40, 3), np.int64))
    res = train_fm(split, split, split, k=3, epochs=2, seed=0)
    back = FMResult.load(res.save(tmp_path / "fm.safetensors"))
    assert back.history == res.history and back.best_epoch == res.best_epoch and back.test_acc == res.test_acc
    for a, b in zip(back.model.parameters(), res.model.parameters()):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(back.logits(X), res.logits(X))


class Planted(RuntimeError):
    pass


def _without_stage3(ref, dest):
    """A copy of a finished run with Stage 3 never run (its folder and manifest entry gone)."""
    shutil.copytree(ref, dest)
    shutil.rmtree(dest / "stage3")
    m = json.loads((dest / "manifest.json").read_text())
    del m["stages"]["stage3"]
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_interrupted_stage3_resumes_to_the_same_bytes(tiny_reference, tiny_world, tmp_path, monkeypatch):
    ref, _ = tiny_reference
    trial = _without_stage3(ref, tmp_path / "trial")
    cmd = ["stage3", "-c", str(tiny_world / "cfg.yaml"), "-r", str(trial), "-q", "--no-deps"]
    real_batch, real_fit, calls = fm_data._batch_matrix, stage3_run.train_fm, {"batch": 0}

    def batch_then_stop(*a, **kw):  # the harmless prompts' batch: after the harmful ones' shard file
        calls["batch"] += 1
        if calls["batch"] == 2:
            raise Planted("interrupted while collecting")
        return real_batch(*a, **kw)

    monkeypatch.setattr(fm_data, "_batch_matrix", batch_then_stop)
    res = CliRunner().invoke(app, cmd)
    assert isinstance(res.exception, Planted)
    shards = sorted(p.name for p in (trial / "stage3").glob("acts-*.partial.safetensors"))
    assert shards == ["acts-harmful-000000-000008.partial.safetensors"]
    monkeypatch.setattr(fm_data, "_batch_matrix", real_batch)

    def fit_then_stop(*a, k, **kw):  # the collapse-check FM: after the main FM's checkpoint
        if k != 4:
            raise Planted("interrupted while training")
        return real_fit(*a, k=k, **kw)

    monkeypatch.setattr(stage3_run, "train_fm", fit_then_stop)
    res = CliRunner().invoke(app, cmd)
    assert isinstance(res.exception, Planted)
    assert (trial / "stage3" / "fm-k4.partial.safetensors").exists()

    def no_main_fit(*a, k, **kw):  # resumed: the main FM comes from its checkpoint
        assert k != 4, "the checkpointed FM was trained again"
        return real_fit(*a, k=k, **kw)

    monkeypatch.setattr(stage3_run, "train_fm", no_main_fit)
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert not list((trial / "stage3").glob("*.partial.safetensors"))  # shards and FM checkpoints dropped at the end
    assert compare_runs(ref, trial, stages=["stage3"]) == []


def test_ranking_head_by_selection_equals_the_full_stable_sort():
    from refusalscope.methods.fm import _ranked

    rng = np.random.default_rng(0)
    s = rng.integers(0, 50, 4000).astype(np.float64)  # many ties
    keep = rng.random(4000) > 0.1
    cols = [(2, i) for i in range(4000)]
    full = np.argsort(np.where(keep, -s, np.inf), kind="stable")
    for top in (1, 7, 100, 999, 3500, None):
        n = int(keep.sum()) if top is None else min(top, int(keep.sum()))
        assert [f[1] for f, _ in _ranked(cols, s, keep, top)] == full[:n].tolist(), top
