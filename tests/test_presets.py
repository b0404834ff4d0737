"""The paper's presets on random-weight models built from the real configs at reduced size
(the real weights cannot be downloaded here): architecture quirks, chat templates and hooks."""

import pytest
import torch
from tiny import tiny_tokenizer
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from refusalscope.io.model import ChatModel
from refusalscope.io.prompt_formats import parse_hub_spec
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
    assert cfg.saes.sae_id.format(layer=12) == "layer_12/width_65k/canonical"  # paper: 65k
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


PAPER_PRESETS = ("gemma-2-2b-it", "gemma-2-2b-it-16k", "llama-3.1-8b-it")


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_follow_the_paper(name):
    cfg = load_config(name)
    # judge: the HarmBench classifier confirms every jailbreak; refusals may stop at the opening
    assert cfg.judge.name == "classifier" and cfg.judge.options["path"] == "cais/HarmBench-Llama-2-13b-cls"
    assert cfg.judge.first_pass == "opening" and cfg.judge.first_pass_tokens < cfg.generation.max_new_tokens
    assert cfg.generation.max_new_tokens == 512 and cfg.judge.degenerate_is_jailbreak is False
    # Stage 1 up to l*, without the grammar layers; the harmful train prompts are refused ones
    assert cfg.stage1.layers == "to_lstar" and cfg.stage1.exclude_layers == [0, 1]
    assert cfg.direction.refused_only and cfg.stage3.ranking == "per_prompt" and cfg.stage3.mode == "tokens"
    # every dataset is a hub id the loaders read
    specs = [getattr(cfg.data, k) for k in ("harmful_train", "harmful_val", "harmful_test", "harmless_train",
                                            "harmless_val", "harmless_test")]
    specs += [*cfg.stage3.harmful, *cfg.stage3.harmless, cfg.analyses.ce_instructions, cfg.analyses.ce_general,
              *cfg.analyses.taxonomy_prompts]
    repos = {parse_hub_spec(s)[0] for s in specs}
    assert repos == {"walledai/HarmBench", "walledai/AdvBench", "tatsu-lab/alpaca", "NeelNanda/pile-10k",
                     "allenai/coconot"}
    assert parse_hub_spec(cfg.data.harmful_train) == ("walledai/HarmBench", "standard", "train[:80%]")
    assert (
        cfg.analyses.taxonomy_field == "subcategory" and cfg.analyses.taxonomy_only == "Requests with safety concerns"
    )


@pytest.mark.parametrize("name, width, release_model", [
    ("gemma-2-2b-it", "65k", "gemma-2-2b"), ("gemma-2-2b-it-16k", "16k", "gemma-2-2b"),
    ("llama-3.1-8b-it", "32k", "meta-llama/Llama-3.1-8B")])
def test_preset_sae_ids_exist_in_the_saelens_registry(name, width, release_model):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    cfg = load_config(name)
    entry = get_pretrained_saes_directory()[cfg.saes.release]
    n_layers = 32 if "llama" in name else 26
    assert entry.model == release_model
    for layer in range(n_layers):
        sae_id = cfg.saes.sae_id.format(layer=layer)
        assert sae_id in entry.saes_map, sae_id
        # the explanations fetched are those of exactly these SAEs
        assert entry.neuronpedia_id[sae_id] == cfg.saes.neuronpedia_id.format(layer=layer)
        assert entry.neuronpedia_id[sae_id].endswith(f"-res-{width}")
    if "llama" in name:  # TopK-trained, loaded as Llama Scope's JumpReLU post-processing
        assert entry.conversion_func == "llama_scope"


def test_llama_preset_takes_the_one_step_pool_to_algorithm_1():
    cfg = load_config("llama-3.1-8b-it")
    assert (cfg.stage1.k_start, cfg.stage1.k_max) == (10, 10) and cfg.stage2.unbroken == "k_max"
    assert load_config("gemma-2-2b-it").stage2.unbroken == "skip"
    assert load_config("gemma-2-2b-it").stage1.k_max == 200


def test_a_preset_may_build_on_a_preset(tmp_path):
    from refusalscope.errors import UserError
    from refusalscope.run.config import config_from_dict

    small = load_config("gemma-2-2b-it-16k")
    assert small.judge == load_config("gemma-2-2b-it").judge and small.name == "gemma-2-2b-it-16k"
    mine = config_from_dict({"preset": "gemma-2-2b-it-16k", "stage1": {"layers": "all"}})
    assert mine.stage1.layers == "all" and mine.saes.sae_id.endswith("16k/canonical")
    assert config_from_dict({"preset": "demo"}).judge.name == "substring"
    with pytest.raises(UserError, match="unknown preset"):
        config_from_dict({"preset": "nope"})
