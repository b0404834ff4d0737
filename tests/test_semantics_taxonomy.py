"""Taxonomy mapping, human-study data, and feature semantics on the planted tiny world."""

import dataclasses
import io
import json
import urllib.error
import urllib.request

import pytest
from planted import HARMFUL, HARMLESS, planted_world

from refusalscope.errors import UserError
from refusalscope.interventions.features import Feature
from refusalscope.io.prompts import Prompt
from refusalscope.io.saes import SAESet
from refusalscope.methods import human_study as hs
from refusalscope.methods import semantics as sem
from refusalscope.methods import taxonomy as tx

CATS = tx.UNSAFE_CATEGORIES


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="module")
def world():
    model, saes = planted_world()
    # a TopK view of layer 2 exercises the full-encode path
    topk = dataclasses.replace(saes[2], architecture="topk", k=16)
    mixed = SAESet({0: saes[0], 1: saes[1], 2: topk, 3: saes[3]})
    return model, mixed


FEATURES = [(l, i) for l in range(4) for i in (0, 1, 5, 17, 40, 77, 100, 127)]


def _dense_acts(model, saes, text_batch):
    """Per layer, every latent on the one text's tokens, [T, d_sae] (one forward for all layers)."""
    res = model.residuals(text_batch, list(saes.layers))
    return {l: saes[l].encode(res[l][0]).float() for l in saes.layers}


def test_category_activity_matches_dense_encode(world):
    model, saes = world
    texts = HARMFUL + HARMLESS[:4]
    prompts = [Prompt(t, id=f"p{j}", category=CATS[j % 5]) for j, t in enumerate(texts)]
    every = [Feature.of(f) for f in tx.layer_features(saes)]
    got = tx.category_activity(model, saes, prompts, every, batch_size=5)
    high = tx.category_activity(model, saes, prompts, every, batch_size=5, threshold=1.0,
                                skip_first=2)
    want = {Feature.of(f).id: {c: 0 for c in CATS} for f in every}
    want_high = {Feature.of(f).id: {c: 0 for c in CATS} for f in every}
    for p in prompts:
        dense = _dense_acts(model, saes, model.encode([p.text]))
        for layer, idx in every:
            want[f"{layer}-{idx}"][p.category] += int((dense[layer][:, idx] > 0).any())
            want_high[f"{layer}-{idx}"][p.category] += int((dense[layer][2:, idx] > 1.0).any())
    assert got == want and high == want_high
    totals = {sum(v.values()) for v in got.values()}
    assert 0 in totals and len(prompts) in totals and len(totals) > 3  # a varied, non-trivial map
    # features given as strings give the same answer; bad ones say what to fix
    assert tx.category_activity(model, saes, prompts, [Feature.of(f).id for f in FEATURES[:3]],
                                batch_size=16) == {Feature.of(f).id: want[Feature.of(f).id] for f in FEATURES[:3]}
    with pytest.raises(UserError, match="no SAE"):
        tx.category_activity(model, saes, prompts, [(9, 1)])
    with pytest.raises(UserError, match="no category"):
        tx.category_activity(model, saes, [Prompt("hi")], [(0, 1)])


def test_category_views_count_every_token_and_without_sinks_in_one_pass(world):
    """The paper's view counts every token (BOS included); the second view leaves out the
    positions whose residual norm exceeds sink_ratio x the row's median, per layer."""
    from refusalscope.methods.activity import sinks

    model, saes = world
    prompts = [Prompt(t, id=f"p{j}", category=CATS[j % 5]) for j, t in enumerate(HARMFUL + HARMLESS[:4])]
    feats = [Feature.of(f) for f in tx.layer_features(saes)]
    every, skipped = tx.category_views(model, saes, prompts, feats, batch_size=5, sink_ratio=1.05)
    assert every == tx.category_activity(model, saes, prompts, feats, batch_size=5)
    assert skipped == tx.category_activity(model, saes, prompts, feats, batch_size=5, sink_ratio=1.05)
    want = {f.id: {c: 0 for c in CATS} for f in feats}
    for p in prompts:
        b = model.encode([p.text])
        res = model.residuals(b, list(saes.layers))
        for layer, idx in feats:
            sink = sinks(res[layer], b.attention_mask.bool(), 1.05)[0]
            a = saes[layer].encode(res[layer][0]).float()[:, idx]
            want[f"{layer}-{idx}"][p.category] += int((a[~sink] > 0).any())
    assert skipped == want and skipped != every
    assert all(skipped[f][c] <= every[f][c] for f in every for c in CATS)


def test_coconot_labels_map_onto_the_five_unsafe_categories():
    names = {"triggers for offensive language": "offensive_language",
             "dangerous_or_sensitive_topics": "dangerous_topics", "False Information": "false_information",
             "privacy violations": "privacy_violations", "Copyright Violations": "copyright_violations",
             "offensive_language": "offensive_language", "Some Other Thing": "some_other_thing"}
    assert {k: tx.unsafe_category(k) for k in names} == names
    rows = [Prompt("a", id="1", category="Requests with safety concerns", subcategory="privacy violations"),
            Prompt("b", id="2", category="Humanizing requests", subcategory="personal"),
            Prompt("c", id="3", category="requests with safety concerns ", subcategory=None),
            Prompt("d", id="4", category="Requests with safety concerns", subcategory="copyright violations")]
    got = tx.taxonomy_prompts(rows, "subcategory", "Requests with safety concerns")
    assert [(p.id, p.category) for p in got] == [("1", "privacy_violations"), ("4", "copyright_violations")]
    plain = tx.taxonomy_prompts([Prompt("x", category="dangerous_topics"), Prompt("y")])
    assert [p.category for p in plain] == ["dangerous_topics"]
    with pytest.raises(UserError, match="taxonomy_only"):
        tx.taxonomy_prompts(rows, "subcategory", "Incomplete requests")


def test_category_map_and_histogram(tmp_path):
    activity = {"1-1": {"offensive_language": 3, "dangerous_topics": 0},
                "1-2": {"offensive_language": 1, "dangerous_topics": 2},
                "2-7": {"offensive_language": 0, "dangerous_topics": 0},
                "3-4": {"offensive_language": 0, "dangerous_topics": 5}}
    cmap = tx.category_map(activity)
    assert cmap == {"1-1": ["offensive_language"], "1-2": ["offensive_language", "dangerous_topics"],
                    "2-7": [], "3-4": ["dangerous_topics"]}
    assert tx.category_map(activity, min_count=2)["1-2"] == ["dangerous_topics"]
    hist = tx.category_histogram(cmap)
    assert hist["by_count"] == {"1": 2, "2": 1, "3": 0, "4": 0, "5": 0}
    assert hist["single"] == {c: int(c in ("offensive_language", "dangerous_topics")) for c in CATS}
    assert hist["none"] == 1 and hist["total"] == 4
    json.dumps(hist)
    out = tx.plot_category_histogram(hist, tmp_path / "fig3.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["fig3.png"]


def _study_inputs():
    cmap, feat = {}, iter((0, i) for i in range(1000))
    for n, size in ((1, 15), (2, 3), (3, 12), (5, 11)):
        for _ in range(size):
            cmap[Feature.of(next(feat)).id] = list(CATS[:n])
    cmap["0-999"] = []  # fires on nothing: never sampled as a pipeline feature
    activity = {f: {c: int(c in cats) for c in CATS} for f, cats in cmap.items()}
    for l in range(1, 6):
        for i in range(40):
            activity[f"{l}-{i}"] = {c: int(i % 3 != 0 and j <= i % 5) for j, c in enumerate(CATS)}
    return cmap, activity


def test_sample_study_buckets_determinism_disjoint():
    cmap, activity = _study_inputs()
    items = hs.sample_study(cmap, activity, seed=3, random_layers=[2, 3, 4])
    assert items == hs.sample_study(cmap, activity, seed=3, random_layers=[2, 3, 4])
    assert items != hs.sample_study(cmap, activity, seed=4, random_layers=[2, 3, 4])
    pipe = [it for it in items if it["source"] == "pipeline"]
    sizes = {n: sum(it["n_categories"] == n for it in pipe) for n in range(1, 6)}
    assert sizes == {1: 10, 2: 3, 3: 10, 4: 0, 5: 10}
    feats = [it["feature"] for it in items]
    assert len(feats) == len(set(feats))
    rand = [it for it in items if it["source"] != "pipeline"]
    assert not {it["feature"] for it in rand} & set(cmap)
    assert all(Feature.of(it["feature"]).layer in (2, 3, 4) for it in rand)
    active = [it for it in rand if it["source"] == "random_active"]
    inactive = [it for it in rand if it["source"] == "random_inactive"]
    assert len(active) == 23 and len(inactive) == 7
    assert all(it["activation_labels"] for it in active)
    assert all(it["activation_labels"] == [] for it in inactive)
    assert all(it["activation_labels"] == cmap[it["feature"]] for it in pipe)
    small = hs.sample_study(cmap, activity, seed=0, per_bucket=2, n_random_inactive=100)
    assert sum(it["source"] == "random_inactive" for it in small) == 5 * 14  # all there are
    br = hs.study_breakdown(items)
    assert sum(br["random_active"].values()) == 23 and "0" not in br["random_active"]
    shuffled = hs.sample_study(cmap, activity, seed=3, random_layers=[2, 3, 4], shuffle=True)
    assert sorted(map(str, shuffled)) == sorted(map(str, items))


def test_majority_and_partial_credit():
    ann = {"1-2": [["dangerous_topics"], ["dangerous_topics", "privacy_violations"], ["None"]],
           (1, 3): [[], ["None"], ["offensive_language"]],
           "1-4": [["false_information"], ["None"], ["privacy_violations"]],
           "1-5": [["privacy_violations", "dangerous_topics"], ["dangerous_topics", "privacy_violations"],
                   ["dangerous_topics"]]}
    maj = hs.majority_labels(ann)
    assert maj == {"1-2": ["dangerous_topics"], "1-3": ["None"], "1-4": [],
                   "1-5": ["dangerous_topics", "privacy_violations"]}
    assert hs.majority_labels(ann, min_agree=3)["1-5"] == ["dangerous_topics"]
    pc = hs.partial_credit
    assert pc(["a", "b"], ["b", "a"]) == 1.0
    assert pc(["a", "b"], ["a"]) == 0.5
    assert pc(["a", "b", "c", "d"], ["a", "x"]) == 0.25
    assert pc(["a"], ["a", "b", "c"]) == 1.0  # extra predicted labels are not penalised
    assert pc(["a"], []) == 0.0
    assert pc(["None"], []) == pc([], None) == pc(None, ["None"]) == 1.0
    assert pc(["None"], ["a"]) == 0.0
    items = [{"feature": "1-2", "source": "pipeline", "activation_labels": ["dangerous_topics"]},
             {"feature": "1-3", "source": "random_inactive", "activation_labels": []},
             {"feature": "1-5", "source": "pipeline", "activation_labels": ["privacy_violations"]},
             {"feature": "9-9", "source": "random_active", "activation_labels": ["x"]}]
    score = hs.study_score(maj, items)
    assert score["by_source"] == {"pipeline": {"score": 0.75, "n": 2},
                                  "random_inactive": {"score": 1.0, "n": 1}}
    assert score["score"] == pytest.approx(2.5 / 3) and score["unscored"] == ["1-4", "9-9"]
    plain = hs.study_score(maj, {"1-2": ["offensive_language"]})
    assert plain["score"] == 0.0 and plain["by_source"] == {"all": {"score": 0.0, "n": 1}}


TEMPLATE = "gemma-2-2b/{layer}-gemmascope-res-16k"


def test_neuronpedia_urls_and_cache_hit(tmp_path, monkeypatch):
    client = sem.NeuronpediaClient(tmp_path, TEMPLATE, offline=False)
    assert client.feature_path((12, 1234)) == "gemma-2-2b/12-gemmascope-res-16k/1234"
    assert client.url("12-1234") == ("https://www.neuronpedia.org/api/feature/"
                                     "gemma-2-2b/12-gemmascope-res-16k/1234")
    llama = sem.NeuronpediaClient(tmp_path, "llama3.1-8b/{layer}-llamascope-res-32k", offline=True)
    assert llama.feature_path("3-7") == "llama3.1-8b/3-llamascope-res-32k/7"
    with pytest.raises(UserError, match="layer"):
        sem.NeuronpediaClient(tmp_path, "gemma-2-2b/gemmascope")
    path = client.cache_file((12, 1234))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"explanations": [{"description": " legal judgement "}]}))

    def boom(*a, **k):
        raise AssertionError("cache hit must not touch the network")
    monkeypatch.setattr(urllib.request, "urlopen", boom)
    assert client.explain([(12, 1234)]) == ({"12-1234": "legal judgement"}, [])


def test_neuronpedia_fetch_writes_cache(tmp_path, monkeypatch):
    calls = []

    def fake(req, timeout):
        calls.append(req.full_url)
        body = {"explanations": [{"description": ""}, {"description": "code syntax"}]}
        return io.BytesIO(json.dumps(body).encode())
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    client = sem.NeuronpediaClient(tmp_path, TEMPLATE, offline=False)
    assert client.explain(["5-9"]) == ({"5-9": "code syntax"}, [])
    assert calls == ["https://www.neuronpedia.org/api/feature/gemma-2-2b/5-gemmascope-res-16k/9"]
    assert sem.parse_explanation(client.cached("5-9")) == "code syntax"
    assert sem.parse_explanation({"explanations": "junk"}) is None
    assert sem.parse_explanation(None) is None


def test_neuronpedia_offline_reports_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("REFUSALSCOPE_OFFLINE", raising=False)
    calls = []

    def down(*a, **k):
        calls.append(1)
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", down)
    client = sem.NeuronpediaClient(tmp_path, TEMPLATE)
    cached = client.cache_file("1-1")
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps({"explanations": [{"description": "violence"}]}))
    with pytest.warns(UserWarning, match="unreachable"):
        exps, missing = client.explain(["1-1", "1-2", "2-3", (0, 4)])
    assert exps == {"1-1": "violence"} and missing == ["0-4", "1-2", "2-3"]
    assert client.offline and len(calls) == 1  # one failed request, then cache only
    monkeypatch.setenv("REFUSALSCOPE_OFFLINE", "1")
    env_client = sem.NeuronpediaClient(tmp_path, TEMPLATE)
    with pytest.warns(UserWarning, match="offline"):
        assert env_client.explain(["1-2"]) == ({}, ["1-2"])
    assert len(calls) == 1


def test_top_activations_match_direct(world):
    model, saes = world
    texts = HARMFUL[:5] + HARMLESS[:3] + [model.format_chat(HARMFUL[5])]
    feats = [(0, 0), (1, 5), (2, 0), (2, 40), (3, 1), (3, 77)]
    top = sem.top_activations(model, saes, texts, feats, k=3, context=2, batch_size=4)
    tok = model.tokenizer
    encs = [model.encode_texts([t if t.startswith(tok.bos_token) else tok.bos_token + t])
            for t in texts]
    dense = [_dense_acts(model, saes, enc) for enc in encs]
    for layer, idx in feats:
        rows = []
        for t, enc in enumerate(encs):
            a = dense[t][layer][:, idx].clone()
            a[0] = 0.0  # BOS skipped
            rows.append((float(a.max()), t, int(a.argmax()), enc.input_ids[0].tolist()))
        rows = sorted((r for r in rows if r[0] > 0), key=lambda r: (-r[0], r[1]))[:3]
        got = top[f"{layer}-{idx}"]
        assert [g["text"] for g in got] == [r[1] for r in rows]
        assert [g["position"] for g in got] == [r[2] for r in rows]
        assert [g["activation"] for g in got] == pytest.approx([r[0] for r in rows], abs=1e-4)
        for g, r in zip(got, rows):
            assert g["token"] == tok.decode(r[3][r[2]:r[2] + 1])
            assert g["token"].strip() in g["word"] and g["word"] in g["context"].split("[[")[1].split("]]")[0]
    assert any(top.values())
    expl = sem.activation_explanation(top["0-0"])
    assert expl.startswith("fires on \"") and "contexts like" in expl
    assert sem.activation_explanation([]) == "no activating examples in the corpus"


def test_examples_and_explanations_read_whole_words():
    """A latent that fires on a piece inside a word is shown and explained by the word: the span
    around every piece of a multi-piece word decodes to that word of the text."""
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    text = "the photosynthesis, of chlorophyll-rich leaves"
    ids = tok(text, add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert len(pieces) > len(text.split())  # the small vocabulary splits words into pieces
    words = []
    for i in range(len(ids)):
        a, b = sem.word_span(tok, ids, i)
        assert a <= i < b
        words.append(tok.decode(ids[a:b]).strip())
    assert [w for w in dict.fromkeys(words) if w] == ["the", "photosynthesis", ",", "of", "chlorophyll", "-",
                                                     "rich", "leaves"]
    inside = pieces.index("ho")  # a piece from the middle of "photosynthesis"
    ex = sem._example(tok, ids, 0, inside, 1.0, 2)
    assert ex["word"] == "photosynthesis" and "photosynthesis]]" in ex["context"]
    assert sem.activation_explanation([ex]).startswith('fires on "photosynthesis"')
    assert sem.top_terms({"1-1": sem.activation_explanation([ex])}) == [("photosynthesis", 1)]


def test_top_terms_and_concepts():
    exps = {"3-1": "Programming code syntax and code comments",
            "3-2": "references to legal judgement in court",
            (1, 9): "Punctuation marks, especially commas and the code of conduct",
            "2-5": "explicit sexual content",
            "2-6": "weather reports in coastal towns",
            "4-4": "expressions of uncertainty or hesitation; he might be unsure"}
    terms = sem.top_terms(exps, n=3)
    assert terms[0] == ("code", 3) and len(terms) == 3
    assert all(t not in ("the", "and", "of", "references") for t, _ in sem.top_terms(exps, n=100))
    # our own activation explanations: the tokens count, their shared context and template do not
    own = {"5-1": 'fires on "garlic", "onion" in contexts like "…<|im_start|>Roast the beans with[[ garlic]]…"',
           "5-2": 'fires on "<|im_start|>" in contexts like "…<|im_start|>Roast the beans…"'}
    assert sem.top_terms(own) == [("garlic", 1), ("onion", 1)]
    # a latent with no activating example has no explanation: its placeholder adds no terms
    assert sem.top_terms({**own, "5-3": sem.activation_explanation([])}) == [("garlic", 1), ("onion", 1)]
    groups = sem.group_by_concepts(exps)
    assert groups["Programming/code"] == ["1-9", "3-1"]
    assert groups["Punctuation"] == ["1-9"]
    assert groups["Legal/judgement"] == ["3-2"]
    assert groups["Sexual"] == ["2-5"]
    assert groups["Uncertainty"] == ["4-4"]
    assert groups["Misc"] == ["2-6"]
    custom = sem.group_by_concepts(exps, {"Weather": ["weather"], "Code": ["COD"]})
    assert custom == {"Weather": ["2-6"], "Code": [], "Misc": ["1-9", "2-5", "3-1", "3-2", "4-4"]}
    assert sem.group_by_concepts(exps, {"Code": ["cod*"]})["Code"] == ["1-9", "3-1"]


def test_sink_positions_are_masked_by_norm_not_by_padding():
    import torch

    from refusalscope.methods.activity import sinks as _sinks

    h = torch.ones(2, 5, 4)
    h[0, 1] *= 50.0  # a massive-activation token
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    h[1, :2] = 0.0  # left padding must not pull the median down
    mask = _sinks(h, valid, 4.0)
    assert mask.tolist() == [[False, True, False, False, False], [False] * 5]
    assert not _sinks(h, valid, None).any()


def test_neuronpedia_fetches_concurrently_after_one_probe(tmp_path, monkeypatch):
    """The first request goes alone; the rest go `workers` at a time: a barrier of 4 parties only
    opens when four requests are in flight together (one by one it breaks and the test fails)."""
    import threading

    barrier, calls, lock = threading.Barrier(4, timeout=20), [], threading.Lock()

    def fake(req, timeout):
        with lock:
            calls.append(req.full_url)
            first = len(calls) == 1
        if not first:
            barrier.wait()
        return io.BytesIO(json.dumps({"explanations": [{"description": req.full_url[-4:]}]}).encode())
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    client = sem.NeuronpediaClient(tmp_path, TEMPLATE, offline=False)
    feats = [f"3-{1000 + i}" for i in range(9)]
    exps, missing = client.explain(feats, workers=4)
    assert missing == [] and exps == {f: f[-4:] for f in feats}
    assert calls[0].endswith("/3-gemmascope-res-16k/1000") and len(calls) == 9
    assert all(client.cached(f) for f in feats)  # every answer written to the cache
