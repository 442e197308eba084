"""A Hugging Face model made exportable: plain tensor inputs in, one tensor out, adapter slots as extra inputs.

:class:`ExportableModel` wraps a causal LM, encoder or classifier as ``forward(input_ids, attention_mask, *slots)``
returning ``logits`` (or ``last_hidden_state``). Its adapter slots are installed by attach's own mechanism
(:class:`adapterkit.attach.AttachedAdapters`): each (module, kind) gets one entry of that kind's runtime whose tensors
are read from the slot inputs of the current call instead of from parameters, with scale 1 (the feeds hold the
scale). So the graph runs exactly the forward functions attach runs — LoRA's low-rank path, BitFit's bias, the
prefix-aware attention with the tokens at positions p..p+n-1, ``full`` tensors in place of the base's — and with
every slot at its default (r = 0, p = 0, Δb = 0, the base tensor) it computes the base model.

:class:`CachedExportableModel` is one generation step of a causal LM: the key/value cache in and out, as
transformers and Optimum lay it out (``past_key_values.<i>.key`` / ``.value`` in, ``present.<i>.key`` / ``.value``
out, each [batch, kv_heads, positions, head_dim]), and ``position_ids`` given. A prefix adapter's keys and values
come in front of the past inside attention, as in a cache that holds them first (PEFT feeds them as past), and the
positions are shifted by p, as attach shifts them.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterkit.attach import AttachedAdapters
from adapterkit.errors import RequestError
from adapterkit.kinds import get_kind
from adapterkit.onnx.slots import split_slot


class SlotValues:
    """The slot tensors of the current call, shared by the slot entries (a plain object: torch.export copies dict
    attributes of modules while tracing, which would unshare them), and in a bank graph each row's entry."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = dict(tensors)
        self.index: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def update(self, pairs) -> None:
        self._tensors.update(pairs)


class SlotSource:
    """Where a slot entry's tensors come from: the graph inputs of its (module, kind), by role."""

    def __init__(self, values: SlotValues, names: dict[str, str]):
        self.values, self.names = values, names

    def tensors(self) -> dict[str, torch.Tensor]:
        return {role: self.values[name] for role, name in self.names.items()}


class BankSource(SlotSource):
    """A bank graph's slot entry: each row's tensors, gathered from the stacked bank by the row's entry (see
    :mod:`adapterkit.onnx.bank`)."""

    each_row = True

    def tensors(self) -> dict[str, torch.Tensor]:
        return {role: self.values[name].index_select(0, self.values.index) for role, name in self.names.items()}


def task_output(output) -> torch.Tensor:
    """The tensor an exported graph returns: ``logits`` for LMs and classifiers, else ``last_hidden_state``."""
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise RequestError(f"the model returns {type(output).__name__}, which has neither logits nor last_hidden_state")


def output_name(model: nn.Module) -> str:
    """A bare transformers model (its own ``base_model``: BertModel, LlamaModel) returns hidden states; a model
    with a head (ForCausalLM, LMHeadModel, ForSequenceClassification) returns logits."""
    return "last_hidden_state" if getattr(model, "base_model", None) is model else "logits"


class ExportableModel(nn.Module):
    """``forward(input_ids, attention_mask, *slot tensors in the order of slot_names)`` -> the task output; with
    ``bank``, ``forward(input_ids, attention_mask, adapter_index, *bank tensors)``."""

    def __init__(self, model: nn.Module, defaults: dict[str, torch.Tensor], bank: bool = False):
        super().__init__()
        self.model = model
        self.slot_names = list(defaults)
        self.defaults = defaults
        self.bank = bank
        self.values = SlotValues(defaults)
        if bank:
            self.values.index = torch.zeros(1, dtype=torch.long)  # until a call gives each row's entry
        source = BankSource if bank else SlotSource
        self.slots = AttachedAdapters(model)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for name in self.slot_names:
            module, kind, role = split_slot(name)
            groups.setdefault((module, kind), {})[role] = name
        for (module, kind), names in groups.items():
            self.slots.install(get_kind(kind).runtime, module, f"slot_{kind}", source(self.values, names), 1.0)
        self.train(model.training)  # the slot modules are new: give them the mode of the model

    def feed(self, slots: tuple[torch.Tensor, ...]) -> None:
        """Give the slot entries this call's tensors (in a bank graph, after each row's entry)."""
        if self.bank:
            self.values.index, slots = slots[0], slots[1:]
        self.values.update(zip(self.slot_names, slots))

    def default_slots(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Every slot at its default (no adapter, or the merged model); a bank's rows on its entry 0, the base."""
        index = (torch.zeros(batch, dtype=torch.long),) if self.bank else ()
        return (*index, *(self.defaults[n] for n in self.slot_names))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *slots: torch.Tensor) -> torch.Tensor:
        self.feed(slots)
        kwargs = {"use_cache": False} if "use_cache" in self.model.config.to_dict() else {}
        return task_output(self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs))

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Eager forward with every slot at its default (no adapter, or the merged model)."""
        with torch.no_grad():
            return self(input_ids, attention_mask, *self.default_slots(input_ids.shape[0]))


def cache_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a causal LM's key/value cache, read from one step of the model itself."""
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True).cache
    keys = cache.layers[0].keys
    return len(cache.layers), keys.shape[1], keys.shape[3]


class CachedExportableModel(ExportableModel):
    """``forward(input_ids, attention_mask, position_ids, past, *slot tensors)`` -> ``(logits, *present)``, where
    ``past`` holds each layer's keys then values (see the module docstring); ``attention_mask`` covers past and new
    tokens."""

    def __init__(self, model: nn.Module, defaults: dict[str, torch.Tensor], bank: bool = False):
        super().__init__(model, defaults, bank)
        self.layers, self.kv_heads, self.head_dim = cache_layout(model)

    def forward(self, input_ids, attention_mask, position_ids, past, *slots):
        from transformers import DynamicCache

        self.feed(slots)
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        return (out.logits, *(t for layer in out.cache.layers for t in (layer.keys, layer.values)))

    def empty_past(self, batch: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(batch, self.kv_heads, 0, self.head_dim) for _ in range(2 * self.layers))

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The logits of a first step (no past, positions 0..n-1), every slot at its default."""
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        with torch.no_grad():
            return self(input_ids, attention_mask, positions, self.empty_past(input_ids.shape[0]),
                        *self.default_slots(input_ids.shape[0]))[0]


def bank_defaults(empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bank graph's inputs at their defaults: a bank of one entry, the base (and its prefix lengths, 0)."""
    from adapterkit.onnx.bank import length_slots

    defaults = {name: tensor[None] for name, tensor in empty.items()}
    defaults.update({name: torch.zeros(1, dtype=torch.long) for name in length_slots(list(empty))})
    return dict(sorted(defaults.items()))


def slot_defaults(model: nn.Module, examples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The value of each slot when no adapter fills it (each kind's :meth:`~adapterkit.kinds.runtime.Runtime.empty`:
    empty LoRA and prefix, zero Δb, the base tensor for ``full``). ``examples`` (one fed tensor per slot, by slot
    name) give the fixed dims."""
    defaults = {}
    for name in sorted(examples):
        module, kind, role = split_slot(name)
        defaults[name] = get_kind(kind).runtime.empty(role, examples[name], model.get_submodule(module))
    return defaults
