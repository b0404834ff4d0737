"""ChatModel on tiny random-weight Llama and Gemma-2: hooks, padding, chat formatting."""

import pytest
import torch
from tiny import tiny_gemma2, tiny_llama

from refusalscope.errors import UserError
from refusalscope.io.hooks import EMBED
from refusalscope.io.model import ChatModel

PROMPTS = ["Write a poem", "How do I bake bread at home? Explain the steps please."]


@pytest.fixture(params=["llama", "gemma2"])
def model(request):
    hf, tok = (tiny_llama if request.param == "llama" else tiny_gemma2)()
    return ChatModel(hf, tok, name=request.param)


def test_hook_point_is_hidden_states_l_plus_1(model):
    batch = model.encode(PROMPTS)
    layers = list(range(model.n_layers - 1))
    got = model.residuals(batch, layers + [EMBED])
    with torch.no_grad():
        out = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=(batch.attention_mask.cumsum(1) - 1).clamp(min=0),
                       output_hidden_states=True)
    real = batch.attention_mask.bool()
    for layer in layers:
        torch.testing.assert_close(got[layer][real], out.hidden_states[layer + 1][real])
    torch.testing.assert_close(got[EMBED][real], out.hidden_states[0][real])


def test_writing_the_stream_changes_logits(model):
    batch = model.encode(PROMPTS)
    base = model.logits(batch)
    with model.hooks({1: lambda h, step: h + 5.0}):
        pushed = model.logits(batch)
    assert (base - pushed).abs().max() > 1e-3
    torch.testing.assert_close(model.logits(batch), base)  # hooks gone after the block


def test_left_padding_matches_unpadded(model):
    batch = model.encode(PROMPTS)
    assert batch.attention_mask[0, 0] == 0  # the short prompt is left-padded
    padded = model.logits(batch)[:, -1]
    for i, p in enumerate(PROMPTS):
        alone = model.logits(model.encode([p]))[:, -1]
        torch.testing.assert_close(padded[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_generation_padded_equals_alone_and_hooks_see_each_step(model):
    batch = model.encode(PROMPTS)
    together = model.generate(batch, max_new_tokens=6)
    assert together == [model.generate(model.encode([p]), max_new_tokens=6)[0] for p in PROMPTS]
    steps = []
    with model.hooks({0: lambda h, s: steps.append((s.n_new, s.is_prompt.clone(), s.token_index.clone()))}):
        model.generate(batch, max_new_tokens=3)
    assert steps[0][0] == batch.input_ids.shape[1] and steps[0][1][1].all()
    lens = batch.lengths
    for k, (n_new, is_prompt, index) in enumerate(steps[1:], start=0):
        assert n_new == 1 and not is_prompt.any()
        assert index[:, 0].tolist() == (lens + k).tolist()


def test_generation_reports_which_rows_ended(model):
    """A row ends only when it emits end-of-sequence; the stripped text cannot tell."""
    batch = model.encode(PROMPTS)
    unembed = model.hf.get_output_embeddings().weight
    with torch.no_grad():  # the tiny models' end token doubles as padding: its row starts at zero
        row = torch.randn(unembed.shape[1], generator=torch.Generator().manual_seed(0))
        unembed[model.tokenizer.eos_token_id] = row * unembed.norm(dim=1).mean() / row.norm()
    eos_row = unembed[model.tokenizer.eos_token_id].detach().clone()

    def force_eos(h, step):  # row 0 is pushed onto the end-of-sequence token after the prompt
        if step.is_prompt.any():
            return h
        h = h.clone()
        h[0] = 100 * eos_row
        return h

    with model.hooks({model.n_layers - 1: force_eos}):
        g = model.generate_full(batch, max_new_tokens=5)
        assert model.generate(batch, max_new_tokens=5) == g.texts
    assert g.ended == [True, False]
    g = model.generate_full(batch, max_new_tokens=5)
    assert g.ended == [False, False]
    # the first step's P(refusal tokens) is the next-token probability at the prompt's end
    p = model.next_token_probs(batch)[:, model.refusal_token_ids].sum(1)
    torch.testing.assert_close(g.p_refusal, p, atol=1e-5, rtol=1e-4)


def test_post_instruction_tokens_are_the_template_suffix(model):
    batch = model.encode(["Write a poem"])
    n = batch.n_post[0]
    assert n >= 2
    suffix = model.tokenizer.decode(batch.input_ids[0, -n:])
    assert "poem" not in suffix and batch.texts[0].endswith(suffix)
    before = model.tokenizer.decode(batch.input_ids[0, -n - 1:-n])
    assert before.strip() in "poem"


def test_system_prompt_on_template_without_system_role():
    hf, tok = tiny_gemma2()
    model = ChatModel(hf, tok, system_prompt="Be brief.")
    text = model.format_chat("Write a poem")
    assert "Be brief." in text and text.index("Be brief.") < text.index("Write a poem")
    hf, tok = tiny_llama()
    text = ChatModel(hf, tok, system_prompt="Be brief.").format_chat("Write a poem")
    assert "<|im_start|>system\nBe brief." in text


def test_missing_chat_template_is_a_clear_error():
    hf, tok = tiny_llama()
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        ChatModel(hf, tok)


def test_unknown_layer_and_empty_prompts_are_clear_errors(model):
    with pytest.raises(UserError, match="unknown hook layer 99"):
        with model.hooks({99: lambda h, s: h}):
            pass
    with pytest.raises(UserError, match="empty"):
        model.encode([])


def test_chunked_batches_equal_one_batch(model):
    batch = model.encode(PROMPTS * 3)
    torch.testing.assert_close(model.logits(batch, batch_size=2), model.logits(batch),
                               atol=1e-4, rtol=1e-4)
    seen = []
    with model.hooks({0: lambda h, s: seen.append(s.row_offset)}):
        model.logits(batch, batch_size=2)
    assert seen == [0, 2, 4]
