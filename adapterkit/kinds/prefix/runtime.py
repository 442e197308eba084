"""Prefix tuning in torch (Li & Liang 2021): every targeted attention module gets p trained key and value vectors
prepended to its own keys and values, and every token may attend to them.

How, without caches: transformers routes attention through ``ALL_ATTENTION_FUNCTIONS`` (the functional
``AttentionInterface``: ``f(module, query, key, value, attention_mask, **kw)``). We register, next to the model's
implementation (``sdpa`` or ``eager``), one named ``adapterkit_prefix_<impl>`` that concatenates the module's prefix
K/V in front of ``key``/``value`` (keys arrive after RoPE: prefix keys are used as given, like cached keys), pads the
mask by p columns the tokens may attend to, and calls the original function. The model is switched to it with
``set_attn_implementation`` and switched back on detach. The prefixes of one attention module are held by a small
child module ``<attention module>.prefix`` (:class:`PrefixStore`), whose entries read their tensors from trainable
parameters (attach) or from graph inputs (the ONNX export) — the same code either way.

Positions: PEFT feeds the prefix as ``past_key_values``, so the model numbers the tokens p..p+n-1 (and PEFT adds p to
``position_ids`` it is given). A forward pre-hook on the model does the same: ``position_ids`` (given, or 0..n-1
after what a cache already holds) + p. With RoPE (Llama) or learned positions (GPT-2, BERT) this gives PEFT's logits.

Per-row attach (mixed batches) and the ONNX adapter bank: row b gets its own adapter's prefix, of length pᵦ (0 for
a row without one): the prefixes are padded with zeros to the longest (the bank's: all its prefixes padded to one
length, each with its length) and the padding masked out of attention, and row b's positions are shifted by its own
pᵦ, which is what row b gets alone.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapterkit import targets
from adapterkit.attach.wrapper import innermost
from adapterkit.errors import RequestError
from adapterkit.kinds.prefix import ROLES
from adapterkit.kinds.runtime import BANK_LENGTH, Runtime, in_dtype

IMPLEMENTATION_PREFIX = "adapterkit_prefix_"
#: initial keys and values ~ N(0, 0.02²): near-zero keys attract little attention, so training starts near the base
PREFIX_STD = 0.02


class PrefixStore(torch.nn.Module):
    """The prefix keys and values of one attention module: one entry per attached prefix (concatenated in attach
    order), each reading its tensors from its source."""

    def __init__(self):
        super().__init__()
        self.adapters = torch.nn.ModuleDict()  # the sources that are modules (parameters), by entry key
        self.sources: list = []

    def add(self, key: str, source) -> None:
        if isinstance(source, torch.nn.Module):
            self.adapters[key] = source
        self.sources.append(source)

    @property
    def length(self):
        """p, the number of prefix positions (symbolic while exporting)."""
        return functools.reduce(lambda a, b: a + b, (s.tensors()["prefix_key"].shape[1] for s in self.sources))

    @property
    def selection(self):
        """The row selection of a per-row attach, or None (every prefix acts on every row)."""
        return next((s.selection for s in self.sources if getattr(s, "selection", None) is not None), None)

    @property
    def each_row(self) -> bool:
        """Whether the prefixes come from an ONNX adapter bank: tensors with a row each, and each row's length."""
        return any(getattr(s, "each_row", False) for s in self.sources)

    @property
    def per_row(self) -> bool:
        """Whether rows have prefixes of their own (a per-row attach or an adapter bank)."""
        return self.each_row or self.selection is not None

    def row_lengths(self) -> torch.Tensor:
        """Each row's number of prefix positions (its adapter's prefixes; 0 without one)."""
        if self.each_row:
            return functools.reduce(torch.add, (s.tensors()[BANK_LENGTH] for s in self.sources))
        selection = self.selection
        lengths = torch.zeros(selection.index.numel(), dtype=torch.long, device=selection.index.device)
        for source in self.sources:
            lengths[selection.rows(source.adapter)] += source.tensors()["prefix_key"].shape[1]
        return lengths

    def extend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, sliding_window: int | None = None):
        """Put the prefixes ([kv_heads, pᵢ, head_dim] each) in front of key/value ([batch, kv_heads, n, head_dim]),
        giving [batch, kv_heads, p+n, head_dim], and grow the mask to match."""
        if self.per_row:
            return self._extend_rows(query, key, value, attention_mask, sliding_window)
        held = [source.tensors() for source in self.sources]
        batch, tokens = key.shape[0], key.shape[2]
        key = torch.cat([*(in_dtype(t["prefix_key"], key.dtype).expand(batch, -1, -1, -1) for t in held), key], dim=2)
        value = torch.cat([*(in_dtype(t["prefix_value"], value.dtype).expand(batch, -1, -1, -1) for t in held), value],
                          dim=2)
        return key, value, _extend_mask(attention_mask, self.length, query.shape[2], tokens, sliding_window)

    def _row_prefixes(self, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row attach: each row's prefix keys and values [batch, kv_heads, longest, head_dim], its adapter's
        prefixes one after the other, zero-padded to the longest of the batch."""
        selection, lengths = self.selection, self.row_lengths()
        longest = int(lengths.max()) if lengths.numel() else 0
        batch, kv_heads, _, head_dim = key.shape
        keys = key.new_zeros(batch, kv_heads, longest, head_dim)
        values = key.new_zeros(batch, kv_heads, longest, head_dim)
        filled: dict[int, int] = {}  # adapter -> prefix positions written (its prefixes follow each other)
        for source in self.sources:
            rows, held = selection.rows(source.adapter), source.tensors()
            start = filled.get(source.adapter, 0)
            end = filled[source.adapter] = start + held["prefix_key"].shape[1]
            if rows.numel():
                keys[rows, :, start:end] = held["prefix_key"].to(key.dtype)
                values[rows, :, start:end] = held["prefix_value"].to(key.dtype)
        return keys, values

    def _extend_rows(self, query, key, value, attention_mask, sliding_window):
        """:meth:`extend` where rows have prefixes of their own: row b attends to its adapter's pᵦ prefix positions,
        zero-padded to a common length (the longest of the batch, or the bank's) with the padding masked, so each
        row attends exactly to its own prefix."""
        if sliding_window is not None:
            raise RequestError("per-row prefixes (a mixed batch, an ONNX adapter bank) in a layer with a sliding "
                               "window are not supported: attach or export the prefix alone")
        if self.each_row:  # a bank: one source, gathered by each row's adapter index
            held = self.sources[0].tensors()
            keys, values = in_dtype(held["prefix_key"], key.dtype), in_dtype(held["prefix_value"], value.dtype)
        else:
            keys, values = self._row_prefixes(key)
            if keys.shape[2] == 0:
                return key, value, attention_mask
        lengths = self.row_lengths()
        batch, _, tokens, _ = key.shape
        longest = keys.shape[2]
        allowed = torch.arange(longest, device=key.device)[None, :] < lengths[:, None]  # [batch, longest]
        queries = query.shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(1, 1, queries, tokens, dtype=torch.bool, device=key.device)
        columns = allowed[:, None, None, :].expand(batch, attention_mask.shape[1], queries, longest)
        if attention_mask.dtype != torch.bool:
            columns = torch.where(columns, 0.0, torch.finfo(attention_mask.dtype).min).to(attention_mask.dtype)
        mask = torch.cat([columns, attention_mask.expand(batch, -1, -1, -1)], dim=-1)
        return torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2), mask


def _extend_mask(attention_mask: torch.Tensor | None, p, queries, tokens, sliding_window: int | None):
    """The mask with p prefix columns in front. The prefix holds positions 0..p-1 and query i position
    p + (tokens - queries) + i (spec §6.4): every query may attend to the prefix, except, in a layer with a sliding
    window w, to the prefix positions j it no longer sees (position - j ≥ w), as a key/value cache holding the prefix
    would hide them. No mask and no window: everything is attended already."""
    if attention_mask is None and sliding_window is None:
        return None
    if sliding_window is None:
        allowed = True if attention_mask.dtype == torch.bool else 0.0  # bool masks keep True, additive masks add 0
        return F.pad(attention_mask, (p, 0), value=allowed)
    device = attention_mask.device if attention_mask is not None else None
    positions = p + (tokens - queries) + torch.arange(queries, device=device)
    visible = (positions[:, None] - torch.arange(p, device=device)[None, :]) < sliding_window  # [queries, p]
    if attention_mask is None:  # the tokens see each other causally within the window
        own = torch.arange(tokens, device=device)
        distance = (tokens - queries + torch.arange(queries, device=device))[:, None] - own[None, :]
        attention_mask = ((distance >= 0) & (distance < sliding_window))[None, None]
    if attention_mask.dtype != torch.bool:
        visible = torch.where(visible, 0.0, torch.finfo(attention_mask.dtype).min).to(attention_mask.dtype)
    columns = visible[None, None].expand(attention_mask.shape[0], attention_mask.shape[1], -1, -1)
    return torch.cat([columns, attention_mask], dim=-1)


def _causal_mask(q_length: int, kv_length: int, device) -> torch.Tensor:
    """Query i (the last q_length of kv_length positions) attends to keys 0..kv_length-q_length+i."""
    return torch.ones(q_length, kv_length, dtype=torch.bool, device=device).tril(kv_length - q_length)[None, None]


def _original_attention(module: torch.nn.Module, implementation: str):
    if implementation == "eager":  # each modeling file has its own eager function
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _prefix_attention(implementation: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        store = getattr(module, "prefix", None)
        if isinstance(store, PrefixStore):
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", False) if causal is None else causal
            if attention_mask is None and causal:  # sdpa's is_causal would align the triangle wrongly once p is added
                attention_mask = _causal_mask(query.shape[2], key.shape[2], query.device)
            key, value, attention_mask = store.extend(query, key, value, attention_mask, kwargs.get("sliding_window"))
        return _original_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)

    return attention


def use_prefix_attention(model: torch.nn.Module) -> str:
    """Switch a transformers model to the prefix-aware variant of its attention implementation (registered on first
    use); returns the implementation it had. Attention modules without a prefix compute as before."""
    if not hasattr(model, "set_attn_implementation"):
        raise RequestError(f"prefix adapters attach to transformers models, not {type(model).__name__}")
    original = model.config._attn_implementation
    if original.startswith(IMPLEMENTATION_PREFIX):
        raise RequestError("this model already has a prefix attached: detach it before attaching another prefix "
                           "(or attach all prefixes in one call)")
    if original not in ("sdpa", "eager"):
        raise RequestError(f"prefix adapters need the model's attention to be sdpa or eager, not {original!r}")
    name = IMPLEMENTATION_PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _prefix_attention(original))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    model.set_attn_implementation(name)
    return original


def _stores(handle) -> list[PrefixStore]:
    """The prefix stores of this attach. The first call switches the model to the prefix-aware attention and shifts
    positions by the prefix length (both undone on detach)."""
    if "prefix_stores" in handle.shared:
        return handle.shared["prefix_stores"]
    model = handle.model
    original = use_prefix_attention(model)
    handle.on_detach(lambda: model.set_attn_implementation(original))
    stores = handle.shared["prefix_stores"] = []
    numbering = _padding_aware_positions(model)
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: _shift_positions(stores, numbering, args, kwargs), with_kwargs=True)
    handle.on_detach(hook.remove)
    return stores


def _padding_aware_positions(model: torch.nn.Module):
    """The module that numbers positions from the token ids, skipping padding (RoBERTa's embeddings:
    ``create_position_ids_from_input_ids``, numbering from ``padding_idx + 1``), or None."""
    return next((m for m in model.modules()
                 if callable(getattr(m, "create_position_ids_from_input_ids", None)) and hasattr(m, "padding_idx")),
                None)


def _shift_positions(stores: list[PrefixStore], numbering, args, kwargs):
    """The positions the model gives its tokens after p cached ones, as when PEFT feeds the prefix as past
    key/values (see the module docstring): ``position_ids`` + p, or the model's own padding-aware numbering
    continued after p (RoBERTa)."""
    per_row = stores[0].per_row
    if per_row:  # each row's own p: [batch, 1], added along the row
        longest = functools.reduce(torch.maximum, (store.row_lengths() for store in stores))[:, None]
    else:
        longest = functools.reduce(torch.sym_max, (store.length for store in stores))
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return args, {**kwargs, "position_ids": position_ids + longest}
    tokens = kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("past_key_values") or kwargs.get("cache")
    cached = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    if numbering is not None and tokens is not None:
        if per_row:  # the numbering continued after each row's p: the padding keeps its position
            position_ids = (numbering.create_position_ids_from_input_ids(tokens, numbering.padding_idx, cached)
                            + longest * tokens.ne(numbering.padding_idx))
        else:
            position_ids = numbering.create_position_ids_from_input_ids(tokens, numbering.padding_idx,
                                                                        cached + longest)
        return args, {**kwargs, "position_ids": position_ids}
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    position_ids = torch.arange(cached, cached + tokens.shape[1], device=tokens.device).unsqueeze(0)
    return args, {**kwargs, "position_ids": position_ids + longest}


def _head_dim(module: torch.nn.Module) -> int | None:
    for name in ("head_dim", "attention_head_size"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    return None


class PrefixRuntime(Runtime):
    dynamic_axes = {"prefix_key": 1, "prefix_value": 1}
    length_of = "prefix_key"  # a padded prefix position would be attended to: the bank masks it by its length

    def fold(self, component, target, roles, weight):
        return super().fold(component, target, roles, 1.0)  # weight 1 only (checked by attach and the reader)

    def check_fits(self, module, path, component, target, roles) -> None:
        attention = innermost(module)
        if not targets.calls_attention(attention):
            raise RequestError(f"component {component.name!r}: target {target!r} ({type(attention).__name__}) does not "
                               "call the attention function itself, so no attention would read its prefix (target "
                               "the module that does, e.g. ...attention.self in BERT)")
        head_dim = _head_dim(attention)
        if head_dim is not None and roles["prefix_key"].shape[2] != head_dim:
            raise RequestError(f"component {component.name!r}, target {target!r}: prefix_key is "
                               f"{list(roles['prefix_key'].shape)}, but {path} has heads of size {head_dim}")

    def install(self, handle, path, key, source, scale, component=None, target=None) -> None:
        stores = _stores(handle)
        module = handle.model.get_submodule(path)
        store = getattr(module, "prefix", None)
        if not isinstance(store, PrefixStore):
            if store is not None:
                raise RequestError(f"{path} already has an attribute 'prefix': cannot attach a prefix to it")
            store = PrefixStore()
            module.prefix = store
            handle.on_detach(lambda: delattr(module, "prefix"))
            stores.append(store)
        store.add(key, source)

    def candidates(self, model, head):
        return targets.attention_modules(model, head)

    def initial(self, model, names, options, generator):
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        length = options["prefix_length"]
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and length >= limit:
            raise RequestError(f"--prefix-length {length} leaves no position for the tokens: the model has "
                               f"{limit} positions")
        tensors = {name: {role: torch.randn(kv_heads, length, head_dim, generator=generator) * PREFIX_STD
                          for role in ROLES} for name in names}
        return {"prefix_length": length}, {}, tensors


RUNTIME = PrefixRuntime()
