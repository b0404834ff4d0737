"""Analyses (hydra latents, controls, CE loss, BOS clamping) on the planted tiny world: each
batched analysis is checked against a direct SAE encode or a naive per-prompt loop."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from planted import HARMFUL, HARMLESS, planted_world

from refusalscope.interventions.engine import intervene
from refusalscope.interventions.features import Feature, FeatureSet
from refusalscope.interventions.spec import Recording
from refusalscope.measures.judges import make_judge
from refusalscope.methods.activity import activity, prefix_lengths, token_counts
from refusalscope.methods.ce_loss import TextSet, ce_table
from refusalscope.methods.clamping import BENIGN_PROMPTS, bos_clamp, clamp_rows
from refusalscope.methods.controls import obrien_baseline, random_control, random_sets, stage3_only
from refusalscope.methods.evaluate import generate_judged, refusal_probs
from refusalscope.methods.hydra import inactive_critical, wake_up

PLANTED = [(l, j) for l in (1, 2, 3) for j in range(3)]


@pytest.fixture(scope="module")
def w():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin (100x slower on a busy box)
    yield _world()
    torch.set_num_threads(threads)


def _world():
    model, saes = planted_world()
    p = refusal_probs(model, None, HARMFUL).sort().values
    # threshold between two prompts' P("I"), never on one: a verdict must not hang on float noise of the batch
    judge = make_judge("first-token", degenerate_is_jailbreak=True, threshold=float(p[2] + p[3]) / 2)
    prompts = [(f"h{i}", t) for i, t in enumerate(HARMFUL)]
    batch = model.encode(HARMFUL)
    res = model.residuals(batch, [0, 1, 2, 3])
    on = {l: (saes[l].encode(res[l]) > 0) & batch.attention_mask.bool()[..., None] for l in range(4)}
    counts = {l: on[l].sum(1) for l in on}  # [B, m] tokens where each latent fires
    sets = {}
    for r, (pid, _) in enumerate(prompts):  # planted + two random + latents silent on the prompt
        silent = [(l, i) for l in (2, 3) for i in (counts[l][r] == 0).nonzero().flatten().tolist()[:4]]
        sets[pid] = PLANTED + [(2, 50), (3, 60)] + silent
    act = activity(model, saes, prompts, sets, batch_size=5)
    return SimpleNamespace(model=model, saes=saes, judge=judge, prompts=prompts, sets=sets,
                           counts=counts, act=act)


def test_activity_matches_direct_encode(w):
    assert set(w.act) == set(w.sets)
    for r, (pid, _) in enumerate(w.prompts):
        a = w.act[pid]
        assert sorted(a.active | a.inactive) == sorted(set(w.sets[pid]))
        assert all(w.counts[l][r, i] > 0 for l, i in a.active)
        assert all(w.counts[l][r, i] == 0 for l, i in a.inactive)
        assert a.inactive  # the fixture planted silent latents


def test_inactive_critical_counts_equal_naive_loop(w):
    """Every count is recounted from a naive loop: one judged generation per prompt and subset, and
    the silent latents read off the fixture's direct SAE encode (not from `activity`)."""
    out = inactive_critical(w.model, w.saes, w.prompts, w.sets, w.act, w.judge, 2, batch_size=7)
    c, recs = out["counts"], out["records"]
    ref = {}
    for r, ((pid, text), rec) in enumerate(zip(w.prompts, recs)):
        silent = [f for f in w.sets[pid] if w.counts[f[0]][r, f[1]] == 0]
        loud = [f for f in w.sets[pid] if f not in silent]
        for name, feats in (("full", w.sets[pid]), ("active", loud), ("inactive", silent)):
            j = generate_judged(w.model, w.saes, [text], [FeatureSet(feats).plan()], w.judge, 2, 1)
            ref[pid, name] = bool(j.jailbroken[0])
            assert rec["jailbroken"][name] == ref[pid, name], (pid, name)
        ref[pid, "silent"] = silent
    ids = [pid for pid, _ in w.prompts]
    full, active = ({p for p in ids if ref[p, k]} for k in ("full", "active"))
    assert c == {
        "n_prompts": 8, "n_with_inactive": sum(bool(ref[p, "silent"]) for p in ids),
        "n_inactive_latents": sum(len(ref[p, "silent"]) for p in ids),
        "n_unique_inactive_latents": len({f for p in ids for f in ref[p, "silent"]}),
        "jailbroken_full": len(full), "jailbroken_active_only": len(active),
        "jailbroken_inactive_only": sum(ref[p, "inactive"] for p in ids),
        "lost_without_inactive": len(full - active), "gained_without_inactive": len(active - full)}
    assert c["n_with_inactive"] == 8 and c["jailbroken_full"] >= 1  # the fixture planted silent latents


def test_wake_up_matches_direct_recording(w):
    model, tok = w.model, w.model.tokenizer
    out = wake_up(model, w.saes, w.prompts, w.act, batch_size=3, tokenizer=tok, threshold=0.0)
    s = out["summary"]
    assert s["n_kept"] == 8 and s["n_woken"] > 0
    for st in out["step2"].values():  # literal step 2: ablating silent latents is a no-op
        assert st["p_inactive_only"] == pytest.approx(st["p_base"], rel=1e-5, abs=1e-9)
    assert prefix_lengths(model, HARMFUL) == [4] * 8  # <|im_start|> u s e r \n
    for rec, (pid, text) in zip(out["records"], w.prompts):
        inactive = w.act[pid].inactive
        rc = Recording(inactive.by_layer())
        batch = model.encode([text])
        with intervene(model, w.saes, rows=[w.act[pid].active.plan()], record=rc):
            model.logits(batch)
        (st,) = rc.prompt_activations()
        ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
        direct = {}
        for l, a in st["acts"].items():
            for c, i in enumerate(rc.features[l]):
                for t in (a[0, :, c] > 0).nonzero().flatten().tolist():
                    direct[((l, i), int(st["token_index"][0, t]))] = float(a[0, t, c])
        got = {(Feature.of(x["feature"]), f["position"]): f for x in rec["woken"] for f in x["firings"]}
        assert set(got) == set(direct), pid
        for key, f in got.items():
            assert f["value"] == pytest.approx(direct[key], rel=1e-4)
            assert f["token_id"] == ids[f["position"]] and f["token"] == tok.decode([ids[f["position"]]])
            assert (f["region"] == "bos") == (f["position"] == 0)
            assert (f["region"] in ("bos", "system")) == (f["position"] < 4)
    woken = [x for r in out["records"] for x in r["woken"]]
    regions = [{f["region"] for f in x["firings"]} for x in woken]
    n_sys = sum(bool(rs & {"bos", "system"}) for rs in regions)
    assert s["n_woken"] == len(woken)
    assert s["system_share"] == pytest.approx(n_sys / len(woken))
    assert s["bos_share"] == pytest.approx(sum("bos" in rs for rs in regions) / len(woken))
    assert s["elsewhere_share"] == pytest.approx(1 - n_sys / len(woken))
    assert s["woken_share"] == pytest.approx(len(woken) / sum(len(a.inactive) for a in w.act.values()))
    assert wake_up(model, w.saes, w.prompts, w.act, 8, ids=["h1"])["summary"]["n_kept"] == 1
    assert wake_up(model, w.saes, w.prompts, w.act, 8, threshold=1e-3, impact="alone")["summary"]["n_kept"] == 0


def test_random_control_samples_active_latents(w):
    counts = token_counts(w.model, w.saes, HARMFUL, [1, 2, 3], batch_size=3)
    for r, cnt in enumerate(counts):
        for l, c in cnt.items():
            assert c == {i: int(n) for i, n in enumerate(w.counts[l][r].tolist()) if n > 0}
    active = {pid: {l: list(c) for l, c in cnt.items()} for (pid, _), cnt in zip(w.prompts, counts)}
    draws = random_sets(w.sets, active, seed=0)
    assert draws == random_sets(w.sets, active, seed=0) and draws != random_sets(w.sets, active, seed=1)
    for pid, d in draws.items():
        assert not d["short"] and not set(d["features"]) & set(map(Feature.of, w.sets[pid]))
        assert Counter(l for l, _ in d["features"]) == Counter(l for l, _ in w.sets[pid])
        assert all(i in active[pid][l] for l, i in d["features"])
    out = random_control(w.model, w.saes, w.prompts, w.sets, w.judge, seeds=(0, 1), max_new_tokens=2)
    assert [p["seed"] for p in out["per_seed"]] == [0, 1]
    text = dict(w.prompts)
    naive = {0: 0, 1: 0}  # each random set ablated alone on its prompt, judged: the per-seed counts
    for rec in out["records"]:
        assert rec["features"] == random_sets(w.sets, active, rec["seed"])[rec["id"]]["features"].ids()
        j = generate_judged(w.model, w.saes, [text[rec["id"]]], [FeatureSet(rec["features"]).plan()], w.judge, 2, 1)
        assert rec["jailbroken"] == j.jailbroken[0], rec["id"]
        naive[rec["seed"]] += bool(j.jailbroken[0])
    assert [(p["seed"], p["jailbroken"]) for p in out["per_seed"]] == sorted(naive.items())


def test_obrien_set_sizes_shrink_with_k(w):
    ks = (1, 2, 4, 8, 64)
    out = obrien_baseline(w.model, w.saes, w.prompts, w.judge, ks=ks, max_new_tokens=2, batch_size=16)
    sizes = [p["mean_set_size"] for p in out["per_k"]]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and sizes[0] > sizes[-1]
    for r, (pid, _) in enumerate(w.prompts):
        per = {x["k"]: x["size"] for x in out["records"] if x["id"] == pid}
        assert per[2] == sum(int((w.counts[l][r] >= 2).sum()) for l in range(4))
    for p in out["per_k"]:
        rows = [x for x in out["records"] if x["k"] == p["k"]]
        assert p["asr"] == pytest.approx(sum(x["jailbroken"] for x in rows) / len(rows))


def test_stage3_only_equals_naive(w):
    s3 = {pid: [(1, 0), (1, 1), (1, 2), (1, 5)] for pid, _ in w.prompts}
    s2 = {pid: [f for f in w.act[pid].active if f[0] >= 2] for pid, _ in w.prompts}
    out = stage3_only(w.model, w.saes, w.prompts, s3, s2, w.judge, max_new_tokens=2, batch_size=5)
    drops = []
    for (pid, text), rec in zip(w.prompts, out["records"]):
        batch = w.model.encode([text])
        with intervene(w.model, w.saes, shared=FeatureSet(s3[pid]).plan()):
            res = w.model.residuals(batch, [2, 3])
        base = {f: float(w.saes[f[0]].encode(w.model.residuals(batch, [f[0]])[f[0]])[0, :, f[1]].max())
                for f in s2[pid]}
        abl = {f: float(w.saes[f[0]].encode(res[f[0]])[0, :, f[1]].max()) for f in s2[pid]}
        off = [f for f in s2[pid] if abl[f] <= 0]
        assert rec["deactivated"] == FeatureSet(off).ids()
        assert rec["deactivated_share"] == pytest.approx(len(off) / len(s2[pid]))
        drops += [(base[f] - abl[f]) / base[f] for f in s2[pid] if abl[f] > 0]
    s = out["summary"]
    assert s["drop_mean"] == pytest.approx(sum(drops) / len(drops), rel=1e-4)
    shares = [r["deactivated_share"] for r in out["records"]]
    assert s["deactivated_mean"] == pytest.approx(sum(shares) / len(shares)) and s["deactivated_max"] == max(shares)
    assert s["deactivated_max"] > 0  # ablating r̂'s latents at layer 1 silences some downstream ones


def _manual_ce(model, texts, saes=None, shared=()):
    batch = model.encode_texts(texts)
    with intervene(model, saes, shared=shared):
        logits = model.logits(batch, last=None)
    valid = batch.attention_mask[:, :-1].bool() & batch.attention_mask[:, 1:].bool()
    labels = batch.input_ids[:, 1:].masked_fill(~valid, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()


def test_ce_table_matches_manual_cross_entropy(w):
    model = w.model
    general = ["The quick brown fox jumps over the lazy dog.", "You are a helpful assistant.",
               "Write a short poem about the sea and the sky.", "How do I bake bread?"]
    ds = [TextSet("general", general), TextSet("alpaca", HARMLESS[:4], chat=True, replies=["Sure."] * 4)]
    mean_h = model.residuals(model.encode(HARMFUL), [2], positions=1)[2][:, -1].mean(0)
    r = mean_h - model.residuals(model.encode(HARMLESS), [2], positions=1)[2][:, -1].mean(0)
    sets = {"a": PLANTED[:3], "b": PLANTED[3:], "c": [(1, 5), (2, 7)]}
    rows = ce_table(model, w.saes, ds, r, sets, batch_size=3)
    tab = {(x["dataset"], x["setting"]): x for x in rows}
    assert len(rows) == 6
    bos = model.tokenizer.bos_token
    assert tab["general", "baseline"]["mean"] == pytest.approx(_manual_ce(model, [bos + t for t in general]), rel=1e-4)
    chat = [model.format_chat(t, "Sure.") for t in HARMLESS[:4]]
    assert tab["alpaca", "baseline"]["mean"] == pytest.approx(_manual_ce(model, chat), rel=1e-4)
    for name in ("general", "alpaca"):
        base = tab[name, "baseline"]["mean"]
        assert abs(tab[name, "direction"]["mean"] - base) > 1e-4
        assert abs(tab[name, "features"]["mean"] - base) > 1e-4 and tab[name, "features"]["std"] > 0
        assert tab[name, "features"]["n_sets"] == 3
    one = ce_table(model, w.saes, ds[:1], None, [PLANTED[3:]], batch_size=3)
    manual = _manual_ce(model, [bos + t for t in general], w.saes, FeatureSet(PLANTED[3:]).plan())
    assert one[-1]["mean"] == pytest.approx(manual, rel=1e-4)


def test_bos_clamping_rows_and_effect(w):
    feats = [(1, 0), (2, 0), (3, 23)]
    rows = bos_clamp(w.model, w.saes, feats, max_new_tokens=4)
    assert len(rows) == len(BENIGN_PROMPTS) * 6
    assert [r["clamp"] for r in rows[:6]] == ["baseline", 2, 4, 6, 8, 10]
    plan_rows = clamp_rows(BENIGN_PROMPTS, feats, (2, 4, 6, 8, 10))
    with intervene(w.model, w.saes, rows=[p for *_, p in plan_rows]):
        probs = w.model.next_token_probs(w.model.encode([p for p, *_ in plan_rows]))
    base = probs[0::6].repeat_interleave(6, 0)
    assert (probs - base).abs().amax() > 1e-4  # clamping BOS moves the last-position logits
    # the planted model answers "I..." whatever the clamp (its lm_head is built to), so the
    # generation path is checked against per-row generation instead of against the baseline
    for (p, c, plan), r in list(zip(plan_rows, rows))[-6:]:
        with intervene(w.model, w.saes, rows=[plan]):
            assert w.model.generate(w.model.encode([p]), max_new_tokens=4) == [r["response"]], c


def test_the_hydra_table_says_which_rule_picked_the_wake_up_prompts():
    from refusalscope.interfaces.tables import summary_tables
    from refusalscope.methods.hydra import critical_counts, wake_summary

    wake = wake_summary([], n_prompts=4, n_with_inactive=2)
    result = {"hydra": {"inactive_critical": critical_counts([]), "wake_up": {**wake, "impact": "ids"}}}
    row = summary_tables(result)["hydra"][1][1][0]
    assert row["prompts picked by"] == "jailbreak lost without the inactive latents" and row["prompts kept"] == 0
    result["hydra"]["wake_up"].update(impact="with_active", threshold=0.25)
    row = summary_tables(result)["hydra"][1][1][0]
    assert row["prompts picked by"] == "fallback: P('I') moves >= 0.25 (relative) when they are added"
