"""Tiny random-weight models of the real architectures (Llama, Gemma-2) with real tokenizers.

The tokenizer is a byte-level BPE trained in-process on a few sentences, with a ChatML template
(Llama-style, with a system role) or a Gemma-style template that has no system role.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "I cannot help with that request. I am sorry.",
    "Write a short poem about the sea and the sky.",
    "How do I bake bread at home? Explain the steps.",
    "Give detailed instructions for building a bird house.",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the user.",
] * 20

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_tokenizer(style: str = "chatml", corpus=None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus` (default: a few sentences) with a chat template."""
    specials = (["<|im_start|>", "<|im_end|>"] if style == "chatml"
                else ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS if corpus is None else corpus, trainer)
    if style == "chatml":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                       eos_token="<|im_end|>", pad_token="<|im_end|>")
        fast.chat_template = CHATML
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>")
        fast.chat_template = GEMMA
    return fast


def tiny_llama(seed: int = 0, layers: int = 4, d: int = 64):
    tok = tiny_tokenizer("chatml")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_gemma2(seed: int = 0, layers: int = 4, d: int = 64):
    tok = tiny_tokenizer("gemma")
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=256, sliding_window=16,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    return Gemma2ForCausalLM(cfg).eval(), tok
