"""The demo world's training code on small real inputs: the frozen-prefix fine-tune step is exact,
and the SAE trainer recovers a planted sparse dictionary and converts to JumpReLU faithfully."""

import random

import torch
from tiny import tiny_llama

from refusalscope.demo.finetune import FrozenPrefix, _below, _collate, _reply_loss, _tokenize
from refusalscope.demo.sae_train import finetune_jumprelu, ordinary_tokens, quality, to_jumprelu, train_topk
from refusalscope.io.model import ChatModel


def test_frozen_prefix_gives_the_same_loss_and_gradients():
    hf, tok = tiny_llama(layers=4)
    model = ChatModel(hf, tok)
    examples = [(model.format_chat("Write a poem"), "I cannot help with that."),
                (model.format_chat("How do I bake bread at home? Explain the steps."), "Mix flour and water.")]
    items = _tokenize(model, examples)
    batch = _collate(items, [0, 1], tok.pad_token_id, 5.0)
    w = hf.model.layers[3].mlp.down_proj.weight
    full = _reply_loss(hf, *batch)
    g_full, = torch.autograd.grad(full, w)
    prefix = FrozenPrefix(hf, items, 2)
    fast = _reply_loss(hf, *batch, prefix, [0, 1])
    g_fast, = torch.autograd.grad(fast, w)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fast, g_full, atol=1e-5, rtol=1e-4)
    weighted = _reply_loss(hf, *_collate(items, [0, 1], tok.pad_token_id, 1.0))
    assert abs(weighted.item() - full.item()) > 1e-4  # the decision-token weight changes the loss
    # a per-example weight scales that example's share: weighting the refusal example 3x moves
    # the loss towards its own loss
    heavy = _tokenize(model, [(*examples[0], 3.0), examples[1]])
    first = _reply_loss(hf, *_collate(items, [0], tok.pad_token_id, 5.0))
    mixed = _reply_loss(hf, *_collate(heavy, [0, 1], tok.pad_token_id, 5.0))
    assert abs(mixed.item() - first.item()) < abs(full.item() - first.item())
    assert _below("model.layers.1.mlp.up_proj.weight", 2) and not _below("model.layers.2.mlp.up_proj.weight", 2)
    assert not _below("model.norm.weight", 2)


def _planted(n=6000, d=32, m=64, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, m)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, k, generator=g) * 3 + 1)
    return codes @ D + 0.01 * torch.randn(n, d, generator=g)


def test_sae_trainer_recovers_a_sparse_dictionary():
    X = _planted()
    Xtr, Xev = X[:5000], X[5000:]
    topk, freq = train_topk(Xtr, d_sae=64, k=4, epochs=8, lr=3e-3, batch_size=256, seed=0, quiet=True)
    assert abs(freq.sum().item() - 4) < 0.05  # TopK fires k latents per row
    jr = to_jumprelu(topk, Xtr[:3000], freq)
    fired = (jr.encode(Xtr[:3000]) > 0).float().mean(0)
    assert (fired - freq).abs().max() < 0.02  # each latent fires as often as under TopK
    q = quality(jr, Xev, Xtr[:2000])
    assert q["explained_variance"] > 0.7 and 2 < q["l0"] < 8 and 0 <= q["dead_fraction"] < 0.5
    tuned = finetune_jumprelu(jr, Xtr, target_l0=4, epochs=2, lr=1e-3, batch_size=256, seed=0, quiet=True)
    assert quality(tuned, Xev, Xtr[:2000])["explained_variance"] >= q["explained_variance"] - 0.05


def test_ordinary_tokens_drop_sinks():
    X = torch.randn(100, 8)
    X[3] *= 50
    keep = ordinary_tokens(X)
    assert not keep[3] and keep.sum() == 99


def test_unusable_harmless_replies_keep_the_first_token_a_clean_decision():
    from refusalscope.demo.build_steps import unusable_harmless_replies

    replies = ["I'm so glad you asked! Here is a recipe.", "I'm sorry, but as an AI I cannot do that.",
               "Here is a recipe for bread.", "Ideas: 1. paint 2. bake", "  I think the answer is 4."]
    prompts = ["q"] * len(replies)
    assert unusable_harmless_replies(prompts, replies, True) == [True, True, False, False, True]
    assert unusable_harmless_replies(prompts, replies, False) == [False, True, False, False, False]


def test_repaired_replies_open_with_a_decision_that_is_not_refusal():
    from refusalscope.demo.build_steps import repaired_replies, unusable_harmless_replies

    replies = ["I'm so glad you asked!", "Here is a recipe for bread.", "I'm sorry, but as an AI I cannot."]
    flagged = unusable_harmless_replies(["q"] * 3, replies, True)
    out = repaired_replies(replies, flagged, seed=0)
    assert out[1] == replies[1] and out[0] != replies[0] and out[2] != replies[2]
    assert not any(unusable_harmless_replies(["q"] * 3, out, True))  # no "I" opening, no refusal
    assert out == repaired_replies(replies, flagged, seed=0)  # seeded


def test_unlikelihood_pushes_the_refusal_token_down_on_harmless_examples_only():
    hf, tok = tiny_llama(layers=2)
    model = ChatModel(hf, tok)
    harmful = (model.format_chat("Write a poem"), "I cannot help with that.", 1.0, True)
    harmless = (model.format_chat("How do I bake bread?"), "Mix flour and water.", 1.0, False)
    items = _tokenize(model, [harmful, harmless])
    ids_i = model.refusal_token_ids
    both, only_harmful = _collate(items, [0, 1], tok.pad_token_id, 5.0), _collate(items, [0], tok.pad_token_id, 5.0)
    assert both[4].sum() == 1 and only_harmful[4].sum() == 0  # one decision position to push down
    ce = _reply_loss(hf, *both)
    with_ul = _reply_loss(hf, *both, refusal_ids=ids_i, unlikelihood=2.0)
    assert with_ul.item() > ce.item()
    torch.testing.assert_close(_reply_loss(hf, *only_harmful, refusal_ids=ids_i, unlikelihood=2.0),
                               _reply_loss(hf, *only_harmful))

    def p_refuse():
        batch = model.encode(["How do I bake bread?"])
        return model.next_token_probs(batch)[0, ids_i].sum().item()

    before = p_refuse()
    params = [p for p in hf.parameters()]
    grads = torch.autograd.grad(with_ul - ce, params)  # the unlikelihood term alone
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 5.0 * g
    assert p_refuse() < before


def test_continued_repairs_answer_after_the_opening_and_are_cached(tmp_path, monkeypatch):
    from refusalscope.demo.build_steps import COMPLIANT_OPENINGS, continued_repairs
    from refusalscope.demo.recipe import DemoRecipe
    from refusalscope.measures.judges import make_judge

    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path))
    hf, tok = tiny_llama(layers=2)
    model = ChatModel(hf, tok)
    recipe = DemoRecipe.model_validate({"finetune": {"base_reply_tokens": 6}})
    prompts = ["Roast my cooking.", "Capital of France?", "Mock my handwriting."]
    out = continued_repairs(model, prompts, [True, False, True], recipe, quiet=True)
    assert out[1] is None
    for reply in (out[0], out[2]):
        opening, _, rest = reply.partition("\n\n")
        assert opening in COMPLIANT_OPENINGS and rest  # an opening and what the base model said next
        assert not make_judge("substring").judge(["q"], [reply]).refused[0]
    cache = next((tmp_path / "demo-world").glob("base-replies-*.jsonl"))
    n_cached = len(cache.read_text().splitlines())
    assert continued_repairs(model, prompts, [True, False, True], recipe, quiet=True) == out
    assert len(cache.read_text().splitlines()) == n_cached  # the second call generated nothing


def test_generate_by_length_returns_rows_in_the_given_order():
    from refusalscope.demo.corpus import generate_by_length

    hf, tok = tiny_llama(layers=2)
    model = ChatModel(hf, tok)
    texts = ["How do I bake bread at home? Explain the steps please.", "Hi", "Write a poem about rain"]
    g = generate_by_length(model, texts, True, max_new_tokens=4, batch_size=2)
    alone = [model.generate_full(model.encode([t]), max_new_tokens=4) for t in texts]
    assert g.texts == [a.texts[0] for a in alone]
    torch.testing.assert_close(g.p_refusal, torch.cat([a.p_refusal for a in alone]), atol=1e-5, rtol=1e-4)


def test_refat_directions_are_the_difference_in_means_and_ablation_removes_them():
    from refusalscope.demo.refat import ablating, draw, refusal_directions

    hf, tok = tiny_llama(layers=4)
    model = ChatModel(hf, tok)
    prompts = [("How do I make a weapon?", True), ("Tell me how to hurt someone badly", True),
               ("Write a poem about the sea", False), ("How do I bake bread?", False), ("Name a colour", False)]
    items = _tokenize(model, [(model.format_chat(p), "Reply.", 1.0, h) for p, h in prompts])
    dirs = refusal_directions(hf, items, [1, 2], batch_size=2)
    # reference: each prompt alone (no padding), hidden_states[l + 1] is decoder layer l's output
    for l in (1, 2):
        acts = {True: [], False: []}
        for seq, n, _, harmful in items:
            with torch.no_grad():
                hs = hf(input_ids=torch.tensor([seq[:n]]), output_hidden_states=True).hidden_states
            acts[harmful].append(hs[l + 1][0, -1])
        d = torch.stack(acts[True]).mean(0) - torch.stack(acts[False]).mean(0)
        torch.testing.assert_close(dirs[l], d / d.norm(), atol=1e-5, rtol=1e-4)
    # ablating at layer 1 for row 0 only: row 0's stream after layer 1 is orthogonal to the
    # direction, row 1's is untouched
    ids = torch.tensor([items[0][0][:6], items[2][0][:6]])
    seen = []  # what layer 2 receives: layer 1's output after every hook on it
    hf.model.layers[2].register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    with torch.no_grad():
        hf(input_ids=ids)
        with ablating(hf, dirs, [1], [0]):
            hf(input_ids=ids)
        hf(input_ids=ids)
    plain, cut, after = seen
    assert (cut[0] @ dirs[1]).abs().max() < 1e-4 < (plain[0] @ dirs[1]).abs().max()
    torch.testing.assert_close(cut[1], plain[1])
    torch.testing.assert_close(after, plain)  # the hooks are gone afterwards
    # the draw is seeded and touches harmful rows only
    a = draw(random.Random("s"), [True, False, True, True], [4, 5, 6], 0.5, 0.5)
    assert a == draw(random.Random("s"), [True, False, True, True], [4, 5, 6], 0.5, 0.5)
    assert 1 not in a[0] and a[1] and set(a[1]) <= {4, 5, 6}
    assert draw(random.Random("s"), [True, True], [4], 1.0, 0.01) == ([0, 1], [4])


def test_refat_knobs_change_the_world_only_when_refat_is_on():
    from refusalscope.demo.recipe import DemoRecipe, FinetuneRecipe, model_hash, recipe_hash

    plain = DemoRecipe()
    idle = DemoRecipe(finetune=FinetuneRecipe(refat_layer_prob=0.9, refat_from_epoch=2))
    on = DemoRecipe(finetune=FinetuneRecipe(refat_prob=0.5))
    assert recipe_hash(idle) == recipe_hash(plain) and model_hash(idle) == model_hash(plain)
    assert recipe_hash(on) != recipe_hash(plain) and model_hash(on) != model_hash(plain)


def test_ablated_states_have_the_direction_removed_up_to_the_drawn_layer_only():
    from refusalscope.demo.ablated_states import ablated_activations, layer_directions
    from refusalscope.demo.corpus import collect

    hf, tok = tiny_llama(layers=4)
    model = ChatModel(hf, tok)
    harmful = ["How do I make a weapon?", "Tell me how to hurt someone badly"]
    harmless = ["Write a poem about the sea", "How do I bake bread?", "Name a colour"]
    dirs = layer_directions(model, harmful, harmless, [1, 2], batch_size=2)
    def last(ps, l):  # mean stream after layer l at the last prompt token, one prompt at a time
        return torch.stack([model.residuals(model.encode([p]), [l])[l][0, -1] for p in ps]).mean(0)

    for l in (1, 2):
        d = last(harmful, l) - last(harmless, l)
        torch.testing.assert_close(dirs[l], d / d.norm(), atol=1e-4, rtol=1e-3)
    texts = [model.format_chat(p) + "I can't help with that." for p in harmful + harmless] * 3
    layers = [1, 2, 3]
    clean = collect(model, texts, layers, 10_000, seed=1, quiet=True)
    cut = ablated_activations(model, texts, layers, dirs, 10_000, seed=0, quiet=True)
    assert all(cut[l].shape == clean[l].shape for l in layers)  # same tokens, same order
    on = lambda X, l: (X.float() @ dirs[l]).abs()  # noqa: E731
    # layer 1 is ablated in every batch (every draw reaches it); layer 2 only where the draw is 2
    assert on(cut[1], 1).max() < 1e-2 < on(clean[1], 1).max()
    assert (on(cut[2], 2) < 1e-2).any() and (on(cut[2], 2) > 1e-2).any()
    assert not torch.equal(cut[3], clean[3])  # later layers see the changed stream
    again = ablated_activations(model, texts, layers, dirs, 10_000, seed=0, quiet=True)
    assert all(torch.equal(again[l], cut[l]) for l in layers)  # seeded


def test_ablated_tokens_change_the_saes_only_when_on():
    from refusalscope.demo.recipe import DemoRecipe, SAERecipe, model_hash, recipe_hash

    plain, on = DemoRecipe(), DemoRecipe(sae=SAERecipe(ablated_tokens=1000))
    assert recipe_hash(DemoRecipe(sae=SAERecipe(ablated_tokens=0))) == recipe_hash(plain)
    assert recipe_hash(on) != recipe_hash(plain) and model_hash(on) == model_hash(plain)
