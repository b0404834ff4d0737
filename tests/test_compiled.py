"""Regional compile (io.compiled) gives the eager results, with interventions applied by the eager
hooks around the compiled layers, and one graph serves every layer, batch size and length."""

import torch
from sae_fixtures import sae_set
from tiny import tiny_gemma2

from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import DirectionAblation, FeatureAblation, Recording
from refusalscope.io.model import ChatModel

PROMPTS = ["Write a poem", "How do I bake bread at home? Explain the steps please.", "Hi",
           "Give detailed instructions for building a bird house."]


def _passes(model, saes):
    """Every kind of forward pass the pipeline makes, with per-row plans and a recording."""
    batch = model.encode(PROMPTS)
    plans = [[FeatureAblation({1: [0, 2, 4]})], [], [FeatureAblation({0: [1], 2: [3, 5]}, "prompt")],
             [DirectionAblation(torch.ones(model.d_model))]]
    rec = Recording({1: [0, 2, 7]})
    out = {"plain": model.logits(batch, last=None),
           "probs": model.next_token_probs(batch, batch_size=3, columns=model.refusal_token_ids),
           "resid": model.residuals(model.encode(PROMPTS[:3]), [1, 2])[2]}
    with intervene(model, saes, rows=plans, record=rec):
        out["rows"] = model.next_token_probs(batch, batch_size=2)
    out["rec"] = rec.max_activation(len(PROMPTS))[1]
    single = [[FeatureAblation({1: [0, 2, 4], 2: [1]})], [], [FeatureAblation({1: [3]})], []]
    with intervene(model, saes, rows=single):  # eager hooks also run in (eager) generation
        out["single"] = model.logits(batch, last=None)
        out["gen"] = model.generate(batch, max_new_tokens=3)
    return out


def test_compiled_layers_match_eager_and_compile_once():
    from torch._dynamo.utils import counters

    hf, tok = tiny_gemma2()
    model = ChatModel(hf, tok, name="gemma2")
    saes = sae_set("jumprelu", [0, 1, 2])
    eager = _passes(model, saes)
    gen = model.generate(model.encode(PROMPTS[:2]), max_new_tokens=3)
    counters.clear()
    model.compile()
    compiled = _passes(model, saes)
    assert model.compile_seconds > 0
    assert counters["stats"]["unique_graphs"] <= 2  # one per attention kind, whatever the shape
    assert compiled.pop("gen") == eager.pop("gen")
    assert (eager["single"] - eager["plain"]).abs().max() > 1e-3  # the ablation did something
    for key, ref in eager.items():
        torch.testing.assert_close(compiled[key], ref, atol=1e-4, rtol=1e-4, msg=key)
    assert model.generate(model.encode(PROMPTS[:2]), max_new_tokens=3) == gen  # generation stays eager
    full = model.next_token_probs(model.encode(PROMPTS))
    torch.testing.assert_close(full[:, model.refusal_token_ids], compiled["probs"])
    assert torch.allclose(full.sum(1), torch.ones(len(PROMPTS)))
