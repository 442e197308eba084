"""Tiny random models of the families users run, built from configs (nothing is downloaded): hidden size 32, two
layers, a 128-token vocabulary, grouped-query attention where the family has it, a small sliding window where the
family has one."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 128}

#: family -> (config class, model class, config options); decoders are causal LMs, encoders bare models
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": False, "multi_query": True}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "bert": ("BertConfig", "BertModel", {}),
    "roberta": ("RobertaConfig", "RobertaModel", {"pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", "DistilBertModel", {"dim": 32, "hidden_dim": 64, "n_layers": 2,
                                                            "n_heads": 4}),
}


ENCODERS = ("bert", "roberta", "distilbert")


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config_name, model_name, options = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**COMMON, **options})
    return getattr(transformers, model_name)(config).eval()
