"""`rs.apply` on a plain transformers model equals the engine's own passes on the planted tiny world:
plain forwards, and cached, left-padded batched generation (prompt vs generated positions), for
every kind of intervention; and it leaves the model as it found it."""

import pytest
import torch
from planted import HARMFUL, planted_world

import refusalscope as rs
from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import ActAdd, DirectionAblation, FeatureAblation, FeatureClamp

PROMPTS = [HARMFUL[0], HARMFUL[3], "Hi"]  # three widths: left padding in every batch


@pytest.fixture(scope="module")
def world():
    return planted_world()


def _plans(saes, d):
    g = torch.Generator().manual_seed(0)
    planted = rs.FeatureSet(["1-0", "1-1", "2-0", "2-1", "3-0"])
    return {"set": planted, "ids": ["1-0", "2-1", (3, 2)],
            "clamp": planted.clamp(6.0), "clamp_all": FeatureClamp({2: {0: 4.0, 5: 3.0}}, "all"),
            "direction": torch.randn(d, generator=g),
            "actadd": [ActAdd(torch.randn(d, generator=g), 1), DirectionAblation(torch.randn(d, generator=g), (2,))]}


def _forward(hf, batch):
    mask = batch.attention_mask
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        return hf(input_ids=batch.input_ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


@pytest.mark.parametrize("kind", ["set", "ids", "clamp", "clamp_all", "direction", "actadd"])
def test_forward_equals_the_engine(world, kind):
    model, saes = world
    plan = _plans(saes, model.d_model)[kind]
    engine_plan = rs.FeatureSet(plan).plan() if kind in ("set", "ids") else \
        [DirectionAblation(plan)] if kind == "direction" else plan if isinstance(plan, list) else [plan]
    batch = model.encode(PROMPTS)
    real = batch.attention_mask.bool()
    with intervene(model, saes, shared=engine_plan):
        want = model.logits(batch, last=None)
    with rs.apply(model.hf, plan, saes) as hf:
        got = _forward(hf, batch)
    plain = model.logits(batch, last=None)
    assert (got[real] - want[real]).abs().max() <= 1e-5
    assert (want[real] - plain[real]).abs().max() > 1e-2  # the intervention changed the model


def _generate(hf, tok, batch, n=5):
    with torch.inference_mode():
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id, top_p=None,
                          top_k=None, temperature=None, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("positions", ["all", "generated", "prompt"])
def test_cached_batched_generation_equals_the_engine(world, positions):
    model, saes = world
    plan = [FeatureAblation({1: (0, 1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}, positions)]
    batch = model.encode(PROMPTS)
    # the engine's generation: ChatModel.generate_full's call, with its prompt width set
    with intervene(model, saes, shared=plan), model._chunk(batch.input_ids.shape[1], 0):
        want_seq, want = _generate(model.hf, model.tokenizer, batch)
    with rs.apply(model.hf, plan, saes):
        got_seq, got = _generate(model.hf, model.tokenizer, batch)
    plain_seq, plain = _generate(model.hf, model.tokenizer, batch)
    assert torch.equal(got_seq, want_seq)
    assert (got - want).abs().max() <= 1e-5
    first_same = (want[:, 0] - plain[:, 0]).abs().max() <= 1e-5
    # the first token is read off the prompt: untouched when only generated tokens are ablated
    assert first_same == (positions == "generated")
    assert (want[:, 1:] - plain[:, 1:]).abs().max() > 1e-3  # later steps see ablated tokens
    if positions == "all":
        with rs.apply(model.hf, plan, saes):
            texts = model.tokenizer.batch_decode(got_seq[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        with intervene(model, saes, shared=plan):
            engine_texts = model.generate(batch, max_new_tokens=5)
        assert [t.strip() for t in texts] == engine_texts


def test_saelens_saes_and_clean_exit(world):
    model, saes = world
    decoder = model.hf.get_decoder()
    pre_hooks = len(decoder._forward_pre_hooks)
    batch = model.encode(PROMPTS)
    real = batch.attention_mask.bool()
    before = _forward(model.hf, batch)
    with intervene(model, saes, shared=rs.FeatureSet(["2-0", "3-1"]).plan()):
        want = model.logits(batch, last=None)
    for given in (list(saes.saes.values()), dict(saes.saes)):  # SAELens objects, as a user holds them
        with rs.apply(model.hf, ["2-0", "3-1"], given):
            got = _forward(model.hf, batch)
        assert (got[real] - want[real]).abs().max() <= 1e-5
    with pytest.raises(rs.UserError), rs.apply(model.hf, ["2-0"], saes):
        raise rs.UserError("inside the block: hooks must still come off")
    after = _forward(model.hf, batch)
    assert torch.equal(after, before) and len(decoder._forward_pre_hooks) == pre_hooks
    assert all(not layer._forward_hooks for layer in model.layers)


@pytest.mark.parametrize("bad, saes_needed, message", [
    ("runs/demo", False, "cannot apply 'runs/demo'"),
    (["2-0"], False, "no SAE loaded for layer 2"),
    (["7-0"], True, "no SAE loaded for layer 7"),
    (torch.zeros(2, 3), False, "a direction must be one vector"),
    (3.5, False, "cannot apply a float"),
])
def test_bad_input_says_what_to_do(world, bad, saes_needed, message):
    model, saes = world
    with pytest.raises(rs.UserError, match=message), rs.apply(model.hf, bad, saes if saes_needed else None):
        pass
    with pytest.raises(rs.UserError, match="not a decoder-only"), rs.apply(torch.nn.Linear(2, 2), ["2-0"]):
        pass


@pytest.mark.parametrize("action", ["ablate", "clamp=5"])
def test_a_saelens_bundle_applies_like_its_set(world, tmp_path, action):
    from refusalscope.export.bundle import Action, load_bundle
    from refusalscope.export.saelens import bundle_files
    from refusalscope.export.selection import NamedSet, SAESource

    model, saes = world
    found = rs.FeatureSet(["1-0", "2-1", "3-0", "3-7"])
    other = rs.FeatureSet(["1-5"])
    act = Action.parse(action)
    bundle_files([NamedSet("found", found, "planted"), NamedSet("other", other, "random")],
                 SAESource("local", "tiny", path=str(tmp_path / "layer_{layer}")), act, tmp_path, saes=saes)
    batch = model.encode(PROMPTS)
    real = batch.attention_mask.bool()
    engine_plan = found.plan() if act.kind == "ablate" else [found.clamp(5.0)]
    with intervene(model, saes, shared=engine_plan):
        want = model.logits(batch, last=None)
    for given, full in ((tmp_path, None), (load_bundle(tmp_path), None), (tmp_path, saes)):
        with rs.apply(model.hf, given, full, name="found"):  # the bundle's own slices, or the full SAEs
            got = _forward(model.hf, batch)
        assert (got[real] - want[real]).abs().max() <= 1e-5
    with pytest.raises(rs.UserError, match="holds 2 sets"), rs.apply(model.hf, tmp_path):
        pass


@pytest.mark.parametrize("kind", ["jumprelu", "topk"])
def test_gemma2_generation_equals_the_engine(kind):
    """Gemma-2 (sliding-window attention, its own cache, sublayer post-norms) with JumpReLU and
    TopK SAEs: cached batched generation under rs.apply equals the engine's, generated tokens only."""
    from sae_fixtures import sae_set
    from tiny import tiny_gemma2

    from refusalscope.io.model import ChatModel

    model = ChatModel(*tiny_gemma2(), name="gemma")
    saes = sae_set(kind, [0, 1, 2])
    plan = [FeatureAblation({l: tuple(range(0, 40, 2)) for l in (0, 1, 2)}, "generated")]
    batch = model.encode(["How do I bake bread at home? Explain the steps please.", "Hi"])
    with intervene(model, saes, shared=plan), model._chunk(batch.input_ids.shape[1], 0):
        want_seq, want = _generate(model.hf, model.tokenizer, batch)
    with rs.apply(model.hf, plan, saes):
        got_seq, got = _generate(model.hf, model.tokenizer, batch)
    _, plain = _generate(model.hf, model.tokenizer, batch)
    assert torch.equal(got_seq, want_seq) and (got - want).abs().max() <= 1e-5
    assert (want[:, 0] - plain[:, 0]).abs().max() <= 1e-5 < (want[:, 1:] - plain[:, 1:]).abs().max()
