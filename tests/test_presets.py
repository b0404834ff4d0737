"""The paper's presets on random-weight models built from the real configs at reduced size
(the real weights cannot be downloaded here): architecture quirks, chat templates and hooks."""

import torch
from tiny import tiny_tokenizer
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from refusalscope.io.model import ChatModel
from refusalscope.run.config import load_config

# The published configs of the two models (transformers config.json), minus sizes we shrink.
GEMMA_2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6,
                  hidden_activation="gelu_pytorch_tanh", vocab_size=256000, rope_theta=10000.0)
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0,
                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   tie_word_embeddings=False)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n{{ sys }}<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def shrink(cfg: dict, **small) -> dict:
    out = dict(cfg)
    out.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, **small)
    return out


def test_gemma_preset_on_reduced_gemma2():
    cfg = load_config("gemma-2-2b-it")
    assert cfg.model.source == "google/gemma-2-2b-it" and cfg.model.refusal_tokens == ["I"]
    assert cfg.saes.release == "gemma-scope-2b-pt-res-canonical"
    assert cfg.saes.sae_id.format(layer=12) == "layer_12/width_16k/canonical"
    tok = tiny_tokenizer("gemma")
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(**shrink(GEMMA_2_2B, head_dim=16, query_pre_attn_scalar=16,
                                                 vocab_size=len(tok), sliding_window=8),
                                        pad_token_id=tok.pad_token_id)).eval()
    model = ChatModel(hf, tok, system_prompt=cfg.model.system_prompt, refusal_tokens=cfg.model.refusal_tokens)
    long = "Explain in detail how the water cycle works across oceans, clouds, rain and rivers " * 2
    batch = model.encode(["Hi", long])  # longer than the sliding window: local layers matter
    assert batch.texts[0].startswith("<bos><start_of_turn>user")
    probs = model.next_token_probs(batch)
    alone = model.next_token_probs(model.encode([long]))
    torch.testing.assert_close(probs[1], alone[0], atol=1e-5, rtol=1e-4)
    res = model.residuals(batch, [2])[2]
    assert res.shape[-1] == 64 and torch.isfinite(res).all()


def test_llama_preset_on_reduced_llama31():
    cfg = load_config("llama-3.1-8b-it")
    assert cfg.saes.release == "llama_scope_lxr_8x" and cfg.saes.sae_id.format(layer=13) == "l13r_8x"
    tok = tiny_tokenizer("chatml")
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**shrink(LLAMA_31_8B, vocab_size=len(tok)),
                                      pad_token_id=tok.pad_token_id)).eval()
    model = ChatModel(hf, tok, refusal_tokens=cfg.model.refusal_tokens)
    batch = model.encode(["Write a poem", "How do I bake bread at home?"])
    assert "Cutting Knowledge Date" in batch.texts[0]
    suffix = tok.decode(batch.input_ids[0, -batch.n_post[0]:])
    assert suffix.startswith("<|eot_id|>") and "assistant" in suffix
    p = model.next_token_probs(batch)
    torch.testing.assert_close(p.sum(1), torch.ones(2), atol=1e-4, rtol=0)
    assert model.refusal_token_ids == tok.encode("I", add_special_tokens=False)
