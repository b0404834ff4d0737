"""The `dashboards` stage on a real tiny run: every latent of the run's sets and study sample
gets a dashboard, and its numbers agree with direct computations on the same model and SAEs."""

import dataclasses

import torch
from planted import HARMFUL, HARMLESS, planted_world

from refusalscope.interventions.features import Feature, FeatureSet
from refusalscope.io.saes import SAESet
from refusalscope.methods.activity import max_activations
from refusalscope.methods.dashboards import LatentDashboard, ValueSample, corpus_dashboards, fm_neighbours
from refusalscope.methods.evaluate import refusal_probs
from refusalscope.methods.latent_effects import effect_pairs, latent_effects
from refusalscope.run.pipeline import Context
from refusalscope.run.results import RunResults
from refusalscope.run.stage_dashboards import passes


def _ctx(run_dir):
    r = RunResults(run_dir)
    return r, Context(r.config(), store=None, quiet=True, log=lambda *_: None)


def test_every_latent_of_the_run_has_a_consistent_dashboard(tiny_run):
    r, ctx = _ctx(tiny_run)
    boards = r.dashboards()
    wanted = {f.id for sets in (r.stage1_sets(), r.stage2_sets(), r.stage3_sets()) for s in sets.values() for f in s}
    wanted |= {it["feature"] for it in r.study_items()}
    assert set(boards) == wanted
    direction, _ = r.direction()
    W_U = ctx.model.hf.get_output_embeddings().weight.detach().float()
    for fid, b in boards.items():
        f = Feature.of(fid)
        w = ctx.saes[f.layer].W_dec[f.index].float()
        assert abs(b.cos_direction - float(w @ direction / (w.norm() * direction.norm()))) < 1e-3
        top_logit = float((w @ W_U.T).max())
        assert abs(b.logits_top[0][1] - top_logit) < 1e-3 and b.logits_top[0][1] >= b.logits_bottom[0][1]
        assert sum(b.histogram.get("counts", [])) == min(b.n_nonzero, b.histogram.get("sampled", 0))
        vals = [x.value for x in b.top]
        assert vals == sorted(vals, reverse=True)
        for x in b.top:  # the window holds the peak at its index; nothing away from sinks is larger
            away = [a for i, a in enumerate(x.acts) if i not in x.sinks or x.peak in x.sinks]
            assert abs(x.acts[x.peak] - x.value) < 1e-3 and max(away) <= x.value + 1e-3
        assert b.explanation and b.explanation_source in ("activations", "neuronpedia")
    assert r.summary("dashboards")["n_latents"] == len(boards)


def test_sink_flag_marks_a_latent_planted_on_bos_and_not_one_planted_on_content_tokens():
    """Two latents planted in layer 1's SAE: one whose encoder reads the BOS residual, with a threshold
    only BOS passes (fires on BOS of every text: the hydra latents' home), and one planted refusal
    latent raised above every BOS value (fires on harmful content only). Their counts come from the
    construction, not from the dashboard code."""
    model, saes = planted_world()
    L, texts = 1, HARMFUL[:4] + HARMLESS[:4]
    bos_tok = model.tokenizer.bos_token
    batch = model.encode_texts([bos_tok + t for t in texts], add_special_tokens=False)
    h = model.residuals(batch, [L])[L].float()
    valid = batch.attention_mask.bool()
    first = batch.input_ids.shape[1] - valid.sum(1)  # left padding: each row's BOS column
    at_bos = torch.zeros_like(valid)
    at_bos[torch.arange(len(texts)), first] = True
    fd = saes[L]
    W_enc, thr = fd.W_enc.clone(), fd.threshold.clone()
    h_bos = h[0, first[0]]
    W_enc[:, 0] = h_bos / h_bos.norm() ** 2  # pre-activation 1 at BOS (the same residual in every row)
    pre = h @ W_enc[:, 0]
    rest = pre[valid & ~at_bos].max()
    assert rest < 0.95 and (pre[at_bos] - 1).abs().max() < 1e-4  # the plant holds: BOS stands alone
    thr[0] = (1 + float(rest)) / 2
    W_enc[:, 1] = fd.W_enc[:, 0]  # the planted refusal latent, threshold above every BOS value
    pre = h @ W_enc[:, 1] + fd.b_enc[1]
    thr[1] = max(0.0, float(pre[at_bos].max())) + 1e-3
    n_content = int(((pre > thr[1]) & valid & ~at_bos).sum())
    assert n_content > 0
    planted = SAESet({L: dataclasses.replace(fd, W_enc=W_enc, threshold=thr)})
    out = corpus_dashboards(model, planted, texts, FeatureSet([Feature(L, 0), Feature(L, 1)]), batch_size=3,
                            sink_ratio=None, top_k=2)
    on_bos, on_content = out[Feature(L, 0)], out[Feature(L, 1)]
    assert (on_bos["bos_texts"], on_bos["n_nonzero"], on_bos["sink_share"]) == (len(texts), len(texts), 1.0)
    assert (on_content["bos_texts"], on_content["n_nonzero"], on_content["sink_share"]) == (0, n_content, 0.0)
    board = lambda f: LatentDashboard(f.id, **out[f], logits_top=[], logits_bottom=[], cos_direction=None)  # noqa: E731
    assert board(Feature(L, 0)).sink_flag and not board(Feature(L, 1)).sink_flag


def test_corpus_pass_matches_the_full_sae_encode(tiny_run):
    """Per-text maxima from the encoder columns alone equal the full SAELens-style encode."""
    r, ctx = _ctx(tiny_run)
    feats = FeatureSet(list(r.dashboards())[:6])
    texts = ["<|im_start|>Write a poem about the sea", "<|im_start|>How do I bake bread at home?"]
    out = corpus_dashboards(ctx.model, ctx.saes, texts, feats, batch_size=1, sink_ratio=None, top_k=2)
    batch = ctx.model.encode_texts(texts, add_special_tokens=False)
    for f in feats:
        res = ctx.model.residuals(batch, [f.layer])[f.layer]
        full = ctx.saes[f.layer].encode(res)[..., f.index] * batch.attention_mask
        bos = batch.input_ids == ctx.model.tokenizer.bos_token_id
        away = full.masked_fill(bos, 0).amax(dim=1)
        got = sorted((w.value for w in out[f]["top"]), reverse=True)
        want = sorted((float(v) for v in away if v > 0), reverse=True)
        if not want:  # fires on BOS only: contexts fall back to the sink positions
            want = sorted((float(v) for v in full.amax(dim=1) if v > 0), reverse=True)
        assert len(got) == len(want) and all(abs(a - b) < 1e-3 for a, b in zip(got, want))
        assert out[f]["n_nonzero"] == int((full > 0).sum())


def test_one_pass_over_several_layers_equals_a_pass_per_layer(tiny_run):
    """The stage groups layers into corpus passes (`passes`) to run the model fewer times: a
    latent's dashboard must not depend on which layers share its pass (its sampled values,
    quantile picks and windows included), or a resumed stage would differ from an unbroken one."""
    r, ctx = _ctx(tiny_run)
    feats = FeatureSet(list(r.dashboards()))
    by_layer = feats.by_layer()
    assert len(by_layer) >= 2, "the tiny run's latents sit in one layer: nothing to group"
    texts = [ctx.model.format_chat(t) for t in HARMFUL + HARMLESS]
    kw = dict(batch_size=3, top_k=2, bands=2, per_band=1, max_values=5)
    together = corpus_dashboards(ctx.model, ctx.saes, texts, feats, **kw)
    apart = {}
    for layer, ix in by_layer.items():
        apart.update(corpus_dashboards(ctx.model, ctx.saes, texts, FeatureSet.from_layers({layer: ix}), **kw))
    assert together == apart
    assert any(b["quantiles"] for b in together.values()), "no quantile band drawn: the seeded picks go untested"


def test_passes_group_layers_in_order_up_to_the_cap():
    by_layer = {2: [1, 2], 3: [5], 5: [0, 1, 2, 3], 7: [9]}
    assert passes(by_layer, cap=3) == [[2, 3], [5], [7]]  # 5 is wider than the cap: alone
    assert passes(by_layer, cap=100) == [[2, 3, 5, 7]]
    assert passes({}, cap=3) == []


def test_delta_p_alone_is_what_ablating_the_latent_does(tiny_run):
    r, ctx = _ctx(tiny_run)
    text = {p.id: p.text for p in r.kept_prompts()}
    checked = 0
    for fid, b in r.dashboards().items():
        for e in b.effects:
            if not e["active"]:
                continue
            p = refusal_probs(ctx.model, ctx.saes, [text[e["prompt"]]] * 2, [[], FeatureSet([fid]).plan()])
            assert abs(e["p_base"] - float(p[0])) < 1e-5 and abs(e["delta_alone"] - float(p[1] - p[0])) < 1e-5
            checked += 1
    assert checked >= 1


def test_delta_p_rows_of_all_prompts_share_batches_and_equal_one_at_a_time(tiny_run):
    """latent_effects batches every (prompt, ablation) row of a shard: its numbers equal one forward
    per ablation and prompt, and its forward passes are ceil(rows / batch) plus one activation pass."""
    r, ctx = _ctx(tiny_run)
    s2, s3 = r.stage2_sets(), r.stage3_sets()
    critical = {pid: FeatureSet([*s2.get(pid, ()), *s3.get(pid, ())]) for pid in set(s2) | set(s3)}
    pairs = effect_pairs(critical, None, 0)
    prompts = [(p.id, p.text) for p in r.kept_prompts() if p.id in pairs][:4] + [("none", "Say hi")]
    model, saes = ctx.model, ctx.saes
    calls = []
    hook = model.hf.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        got = {e["id"]: e for e in latent_effects(model, saes, prompts, pairs, s2, batch_size=8)}
    finally:
        hook.remove()

    def p_of(text, feats):  # one forward for one ablation of one prompt
        plan = FeatureSet(feats).plan() if feats else []
        return float(refusal_probs(model, saes, [text], [plan], batch_size=1)[0])

    rows = 0
    for pid, text in prompts[:-1]:
        feats, s = FeatureSet(pairs[pid]), FeatureSet(s2.get(pid, ()))
        act = max_activations(model, saes, [text], feats, batch_size=1)[0]
        base = p_of(text, [])
        assert abs(got[pid]["p_base"] - base) < 1e-6
        rows += 1 + bool(s)
        for e in got[pid]["effects"]:
            f = Feature.of(e["feature"])
            assert e["active"] == (act[f] > 0) and abs(e["activation"] - round(act[f], 4)) < 1e-4
            assert abs(e["p_alone"] - (p_of(text, [f]) if act[f] > 0 else base)) < 1e-6
            rows += int(act[f] > 0)
            if f in s and len(s) > 1:
                assert abs(e["p_without"] - p_of(text, list(s - [f]))) < 1e-6
                rows += 1
    assert got["none"] == {"id": "none", "p_base": None, "p_set": None, "effects": []}
    assert rows > 8 and len(calls) == 1 + -(-rows // 8)


def test_fm_neighbours_are_the_nearest_embeddings():
    V = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    cols = ["1-0", "1-1", "2-5", "3-7"]
    near = fm_neighbours(V, cols, ["1-0", "9-9"], k=2)
    assert set(near) == {Feature(1, 0)}  # a latent that is no FM column has no neighbours
    assert [f for f, _ in near[Feature(1, 0)]] == ["1-1", "2-5"]
    assert near[Feature(1, 0)][0][1] > near[Feature(1, 0)][1][1]


def test_effect_pairs_cap_prompts_per_latent_with_a_seed():
    critical = {f"p{i}": ["1-1", f"2-{i}"] for i in range(10)}
    a, b = effect_pairs(critical, 3, seed=0), effect_pairs(critical, 3, seed=0)
    assert a == b
    assert sum("1-1" in v for v in a.values()) == 3  # the shared latent is measured on 3 prompts
    assert all(f"2-{i}" in a[f"p{i}"] for i in range(10))  # every other latent on its only prompt
    assert sum("1-1" in v for v in effect_pairs(critical, None, seed=0).values()) == 10


def test_value_sample_is_uniform_and_capped_per_latent():
    g = torch.Generator().manual_seed(0)
    sample = ValueSample(3, 2000, g)
    for start in range(0, 20000, 1000):  # latent 0 sees 0..19999 in order, latent 2 only 5 values
        vals = torch.arange(start, start + 1000, dtype=torch.float32)
        sample.add(torch.zeros(1000, dtype=torch.long), vals)
        if start < 5:
            sample.add(torch.tensor([2]), torch.tensor([float(start)]))
    kept = sample.per_latent()
    assert [len(k) for k in kept] == [2000, 0, 1]
    assert len(set(kept[0].tolist())) == 2000
    # a uniform sample of 0..19999 has mean near 10000; keep-the-first or keep-the-last would not
    assert abs(float(kept[0].mean()) - 10000) < 600
