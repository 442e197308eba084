"""Prefix tuning, attached (Li & Liang 2021): every targeted attention module gets p trained key and value vectors
prepended to its own keys and values, and every token may attend to them.

How, without caches: transformers routes attention through ``ALL_ATTENTION_FUNCTIONS`` (the functional
``AttentionInterface``: ``f(module, query, key, value, attention_mask, **kw)``). We register, next to the model's
implementation (``sdpa`` or ``eager``), one named ``adapterkit_prefix_<impl>`` that concatenates the module's prefix
K/V in front of ``key``/``value`` (keys arrive after RoPE: prefix keys are used as given, like cached keys), pads the
mask by p columns the tokens may attend to, and calls the original function. The model is switched to it with
``set_attn_implementation`` and switched back on detach. Prefix K/V are parameters of a small child module
``<attention module>.prefix`` (``prefix.prefix_key[<adapter index>_<component>]``, shape [kv_heads, p, head_dim]), so
they can be trained or made graph inputs.

Positions: PEFT feeds the prefix as ``past_key_values``, so the model numbers the tokens p..p+n-1 (and PEFT adds p to
``position_ids`` it is given). A forward pre-hook on the model does the same: ``position_ids`` (given, or 0..n-1
after what a cache already holds) + p. With RoPE (Llama) or learned positions (GPT-2, BERT) this gives PEFT's logits.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapterkit.errors import AdapterError

IMPLEMENTATION_PREFIX = "adapterkit_prefix_"


class PrefixKV(torch.nn.Module):
    """The prefix keys and values of one attention module, one pair per attached prefix component (concatenated in
    attach order)."""

    def __init__(self):
        super().__init__()
        self.prefix_key = torch.nn.ParameterDict()
        self.prefix_value = torch.nn.ParameterDict()

    @property
    def length(self) -> int:
        return sum(key.shape[1] for key in self.prefix_key.values())

    def extend(self, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None):
        return prepend(list(self.prefix_key.values()), list(self.prefix_value.values()), key, value, attention_mask)


def prepend(prefix_keys: list[torch.Tensor], prefix_values: list[torch.Tensor], key: torch.Tensor,
            value: torch.Tensor, attention_mask: torch.Tensor | None):
    """Put prefixes ([kv_heads, pᵢ, head_dim] each) in front of key/value ([batch, kv_heads, n, head_dim]), giving
    [batch, kv_heads, p+n, head_dim] with p = Σpᵢ, and grow the mask to match."""
    batch = key.shape[0]
    key = torch.cat([*(k.expand(batch, -1, -1, -1) for k in prefix_keys), key], dim=2)
    value = torch.cat([*(v.expand(batch, -1, -1, -1) for v in prefix_values), value], dim=2)
    return key, value, _extend_mask(attention_mask, sum(k.shape[1] for k in prefix_keys))


def _extend_mask(attention_mask: torch.Tensor | None, p: int) -> torch.Tensor | None:
    """Let every query attend to the p prefix columns in front (no mask means everything is attended already)."""
    if attention_mask is None:
        return None
    allowed = True if attention_mask.dtype == torch.bool else 0.0  # bool masks keep True, additive masks add 0
    return F.pad(attention_mask, (p, 0), value=allowed)


def _causal_mask(q_length: int, kv_length: int, device) -> torch.Tensor:
    """Query i (the last q_length of kv_length positions) attends to keys 0..kv_length-q_length+i."""
    return torch.ones(q_length, kv_length, dtype=torch.bool, device=device).tril(kv_length - q_length)[None, None]


def _original_attention(module: torch.nn.Module, implementation: str):
    if implementation == "eager":  # each modeling file has its own eager function
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _prefix_attention(implementation: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        prefix = getattr(module, "prefix", None)  # a PrefixKV, or anything with its extend() (the ONNX export's)
        if callable(getattr(prefix, "extend", None)):
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", False) if causal is None else causal
            if attention_mask is None and causal:  # sdpa's is_causal would align the triangle wrongly once p is added
                attention_mask = _causal_mask(query.shape[2], key.shape[2], query.device)
            key, value, attention_mask = prefix.extend(key, value, attention_mask)
        return _original_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)

    return attention


def use_prefix_attention(model: torch.nn.Module) -> str:
    """Switch a transformers model to the prefix-aware variant of its attention implementation (registered on first
    use); returns the implementation it had. Attention modules without a ``prefix`` compute as before."""
    if not hasattr(model, "set_attn_implementation"):
        raise AdapterError(f"prefix adapters attach to transformers models, not {type(model).__name__}")
    original = model.config._attn_implementation
    if original.startswith(IMPLEMENTATION_PREFIX):
        raise AdapterError("this model already has a prefix attached: detach it before attaching another prefix "
                           "(or attach all prefixes in one call)")
    if original not in ("sdpa", "eager"):
        raise AdapterError(f"prefix adapters need the model's attention to be sdpa or eager, not {original!r}")
    name = IMPLEMENTATION_PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _prefix_attention(original))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    model.set_attn_implementation(name)
    return original


def _prefix_stores(handle) -> list[PrefixKV]:
    """The prefix stores of this attach. The first call switches the model to the prefix-aware attention and shifts
    positions by the prefix length (both undone on detach)."""
    if "prefix_stores" in handle.shared:
        return handle.shared["prefix_stores"]
    model = handle.model
    original = use_prefix_attention(model)
    handle.on_detach(lambda: model.set_attn_implementation(original))
    stores = handle.shared["prefix_stores"] = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: _shift_positions(stores, args, kwargs),
                                           with_kwargs=True)
    handle.on_detach(hook.remove)
    return stores


def _shift_positions(stores: list[PrefixKV], args, kwargs):
    """position_ids + p, as when PEFT feeds the prefix as past key/values (see the module docstring)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        cache = kwargs.get("past_key_values") or kwargs.get("cache")
        cached = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        position_ids = token_positions(tokens.shape[1], tokens.device, cached)
    return args, {**kwargs, "position_ids": position_ids + max(store.length for store in stores)}


def token_positions(length: int, device, cached: int = 0) -> torch.Tensor:
    """[1, length] positions of new tokens after ``cached`` ones, before the prefix shift: what transformers uses
    when no position_ids are given."""
    return torch.arange(cached, cached + length, device=device).unsqueeze(0)


def attach(handle, index: int, component, tensors, weight: float) -> None:
    if weight != 1.0:
        raise AdapterError(f"component {component.name!r} is a prefix with weight {weight:g}: a prefix cannot be "
                           "weighted (its keys enter a softmax); attach it with weight 1")
    stores = _prefix_stores(handle)
    for target in component.targets:
        path = handle.resolve(component.name, target)
        module = handle.model.get_submodule(path)
        store = getattr(module, "prefix", None)
        if not isinstance(store, PrefixKV):
            if store is not None:
                raise AdapterError(f"{path} already has an attribute 'prefix': cannot attach a prefix to it")
            store = PrefixKV()
            module.prefix = store
            handle.on_detach(lambda module=module: delattr(module, "prefix"))
            stores.append(store)
        like = next(module.parameters(), None)
        store_key = f"{index}_{component.name}"
        store.prefix_key[store_key] = handle.parameter(index, f"{component.name}.{target}.prefix_key",
                                                       tensors[target]["prefix_key"], like)
        store.prefix_value[store_key] = handle.parameter(index, f"{component.name}.{target}.prefix_value",
                                                         tensors[target]["prefix_value"], like)
