"""Tiny randomly initialised transformers models built from configs (nothing is downloaded), and adapters for them."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from adapterkit import Adapter, BaseModel, Component, Manifest, fingerprint
from adapterkit.adapter import tensor_name
from adapterkit.arrays import to_torch
from adapterkit.kinds import get_kind

VOCAB = 128


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def causal_lm(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny causal LM of a family llama.cpp converts (llama, mistral, qwen2, qwen3, gemma, phi3), the size of
    :func:`llama`, with its norm weights randomised too (so that a converter that mishandles them shows)."""
    import transformers

    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    }[family]
    options = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=family == "gemma",
                   head_dim=8)
    if family == "phi3":
        options.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    options.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**options)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=2,
    )


def bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config()).eval()


def bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config()).eval()


#: the three families every kind is checked on
MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert}


def random_lora(model: torch.nn.Module, targets: list[str], rank: int = 4, alpha: float = 8.0, seed: int = 1,
                name: str = "default", scaling: str = "standard", fan_in_fan_out: bool = False,
                base_id: str = "tiny") -> Adapter:
    """A LoRA adapter with random A and B (B not zero, so it changes the output) for the named Linear modules."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors = {}
    for target in targets:
        weight = modules[target].weight
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        tensors[tensor_name(name, target, "lora_A")] = torch.randn(rank, in_features, generator=generator) * 0.1
        tensors[tensor_name(name, target, "lora_B")] = torch.randn(out_features, rank, generator=generator) * 0.1
    params = {"rank": rank, "alpha": alpha, "scaling": scaling, "fan_in_fan_out": fan_in_fan_out}
    manifest = Manifest(
        components=[Component(name, "lora", list(targets), params)],
        base_model=BaseModel(base_id, None, fingerprint(model)),
    )
    return Adapter(manifest, tensors)


def torch_roles(roles: dict) -> dict[str, torch.Tensor]:
    """An adapter target's tensors ({role: numpy array}) as torch tensors."""
    return {role: to_torch(array) for role, array in roles.items()}


def merged_delta(component, target: str, roles: dict, weight: float = 1.0) -> torch.Tensor:
    """What merge adds to a target's base weight (stored layout, float32): the kind's merge applied to zeros."""
    runtime = get_kind(component.kind).runtime
    a, b = roles["lora_A"], roles["lora_B"]
    shape = [b.shape[0], a.shape[1]]
    delta = torch.zeros(shape[::-1] if component.param(target, "fan_in_fan_out", False) else shape)
    runtime.merge(component, target, roles, "weight", delta, weight * component.weight)
    return delta
