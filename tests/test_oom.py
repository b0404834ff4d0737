"""Out of memory on a forward or generation halves the batch and retries (io/oom.py). On the CPU
the GPU's error is raised by a decoder layer whenever a chunk has more rows than a budget, midway
through the forward (after earlier layers' hooks ran), as a real OOM would be."""

import pytest
import torch
from planted import HARMFUL, planted_world
from tiny import tiny_llama

from refusalscope.errors import UserError
from refusalscope.interventions.features import Feature, FeatureSet
from refusalscope.io.model import ChatModel
from refusalscope.methods.hydra import woken_latents
from refusalscope.methods.records import Activity


def limit_rows(model: ChatModel, budget: int, layer: int = 2):
    """Make decoder layer `layer` raise CUDA's OutOfMemoryError on chunks above `budget` rows."""
    block = model.layers[layer]
    original = block.forward
    calls = {"oom": 0}

    def forward(hidden_states, *args, **kwargs):
        if hidden_states.shape[0] > budget:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(hidden_states, *args, **kwargs)

    block.forward = forward
    return calls


@pytest.fixture
def model():
    hf, tok = tiny_llama(seed=3)
    m = ChatModel(hf, tok)
    m.log_lines = []
    m.log = m.log_lines.append
    return m


def test_forward_and_generation_halve_until_they_fit(model):
    batch = model.encode(HARMFUL)
    want_logits = model.logits(batch, last=None, batch_size=2)
    want_res = model.residuals(batch, [1, 3], batch_size=2)
    want_gen = model.generate_full(batch, max_new_tokens=5, batch_size=2)
    calls = limit_rows(model, budget=2)

    got = model.logits(batch, last=None, batch_size=8)
    assert torch.equal(got, want_logits)
    assert [m.split(":")[0] for m in model.log_lines] == ["out of memory in logits (cpu)"] * 2
    assert "halved to 4" in model.log_lines[0] and "halved to 2" in model.log_lines[1]
    n = calls["oom"]
    model.logits(batch, last=None, batch_size=8)  # the size that fitted is remembered
    assert calls["oom"] == n and len(model.log_lines) == 2

    res = model.residuals(batch, [1, 3], batch_size=8)
    assert all(torch.equal(res[layer], want_res[layer]) for layer in (1, 3))
    gen = model.generate_full(batch, max_new_tokens=5, batch_size=8)
    assert gen.texts == want_gen.texts and gen.ended == want_gen.ended
    assert torch.equal(gen.p_refusal, want_gen.p_refusal)
    assert any(m.startswith("out of memory in generate_full") for m in model.log_lines)
    assert any(m.startswith("out of memory in residuals") for m in model.log_lines)


def test_one_row_that_does_not_fit_is_a_one_line_error(model):
    limit_rows(model, budget=0)
    with pytest.raises(UserError, match="out of memory on a single row in logits"):
        model.logits(model.encode(HARMFUL[:3]), batch_size=2)


def test_other_errors_are_not_retried(model):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    model.layers[1].forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        model.logits(model.encode(HARMFUL[:3]), batch_size=2)
    assert model.log_lines == []


def test_recorded_activations_of_a_retried_chunk_count_once():
    """Hydra's woken latents read every recorded step: a chunk that failed after recording
    layers 0-1 must not add its rows twice."""
    model, saes = planted_world()
    prompts = [(f"p{i}", t) for i, t in enumerate(HARMFUL)]
    act = {pid: Activity(pid, FeatureSet([Feature(1, 0), Feature(2, 1)]),
                         FeatureSet([Feature(0, 5), Feature(3, j), Feature(3, 0)]))
           for j, (pid, _) in enumerate(prompts)}
    want = woken_latents(model, saes, prompts, act, batch_size=2)
    assert any(r["woken"] for r in want)
    model.log = lambda msg: None
    limit_rows(model, budget=2, layer=2)
    assert woken_latents(model, saes, prompts, act, batch_size=8) == want
