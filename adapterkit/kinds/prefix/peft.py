"""Prefix tuning in PEFT's files (``peft_type: PREFIX_TUNING``).

``prompt_embeddings`` [p, layers·2·kv_heads·head_dim] is read by PEFT's ``get_prompt`` as
view(p, 2·layers, heads, head_dim) permuted to [2·layers, heads, p, head_dim], layer i taking key 2i and value 2i+1;
we store each layer's key and value [kv_heads, p, head_dim] on the module whose attention call reads it
(:func:`adapterkit.targets.attention_modules` on the base's skeleton, so reading one needs the base).
"""

from __future__ import annotations

import numpy as np

from adapterkit import targets
from adapterkit.errors import FormatError, RequestError
from adapterkit.manifest import Component

PEFT_TYPE = "PREFIX_TUNING"
KEY = "prompt_embeddings"
#: architecture name ending -> PEFT task type (prefix tuning needs one to pick the PeftModel class)
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "Model": "FEATURE_EXTRACTION"}


def read(config: dict, tensors: dict[str, np.ndarray], context: dict) -> list[tuple[Component, dict]]:
    if config.get("num_transformer_submodules", 1) != 1:
        raise FormatError("prefix tuning of encoder-decoder models (num_transformer_submodules 2) is not supported")
    if set(tensors) != {KEY}:
        raise FormatError(f"a PEFT prefix adapter holds exactly one tensor, {KEY}")
    try:
        layers, heads, length = int(config["num_layers"]), int(config["num_attention_heads"]), \
            int(config["num_virtual_tokens"])
        head_dim = int(config["token_dim"]) // heads
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise FormatError("adapter_config.json lacks num_layers, num_attention_heads, num_virtual_tokens or "
                          "token_dim as positive integers") from None
    embeddings = tensors.pop(KEY)
    if list(embeddings.shape) != [length, layers * 2 * heads * head_dim]:
        raise FormatError(f"{KEY} is {list(embeddings.shape)}, the config implies "
                          f"[{length}, {layers * 2 * heads * head_dim}]")
    # As PEFT's get_prompt: [p, 2L·H·D] -> [p, 2L, H, D] -> [2L, H, p, D]; layer i: key 2i, value 2i+1.
    per_layer = embeddings.reshape(length, 2 * layers, heads, head_dim).transpose(1, 2, 0, 3)
    names = _attention_modules(context.get("base"), layers)
    held = {name: {"prefix_key": np.ascontiguousarray(per_layer[2 * i]),
                   "prefix_value": np.ascontiguousarray(per_layer[2 * i + 1])} for i, name in enumerate(names)}
    return [(Component("prefix", "prefix", names, {"prefix_length": length}), held)]


def _attention_modules(base, layers: int) -> list[str]:
    if base is None:
        raise RequestError("a PEFT prefix adapter does not name the attention modules it feeds: pass the base model "
                           "(--base) to find them")
    found = targets.attention_modules(targets.skeleton(base))
    if len(found) != layers:
        raise FormatError(f"the adapter has {layers} prefix layers but the base has {len(found)} modules that "
                          "call the attention function (is this its base?)")
    return found


def write(component: Component, tensors: dict, config: dict, context: dict) -> dict[str, np.ndarray]:
    layers = [tensors[target] for target in component.targets]
    heads, length, head_dim = layers[0]["prefix_key"].shape
    stacked = np.stack([t for layer in layers for t in (layer["prefix_key"], layer["prefix_value"])])
    embeddings = stacked.transpose(2, 0, 1, 3).reshape(length, -1)  # the inverse of read's reshape and transpose
    task_type = "CAUSAL_LM"
    if context.get("base") is not None:
        architecture = (targets.base_config(context["base"]).architectures or [""])[0]
        task_type = next((t for suffix, t in TASK_TYPES.items() if architecture.endswith(suffix)), None)
    config.update({"peft_type": PEFT_TYPE, "task_type": task_type, "num_virtual_tokens": length,
                   "num_layers": len(layers), "token_dim": heads * head_dim, "num_attention_heads": heads,
                   "encoder_hidden_size": heads * head_dim, "prefix_projection": False,
                   "num_transformer_submodules": 1})
    return {KEY: np.ascontiguousarray(embeddings)}


def empty_config() -> dict:
    return {}
