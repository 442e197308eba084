"""A Hugging Face model made exportable: plain tensor inputs in, one tensor out, adapter slots as extra inputs.

:class:`ExportableModel` wraps a causal LM, encoder or classifier as ``forward(input_ids, attention_mask, *slots)``
returning ``logits`` (or ``last_hidden_state``). Before it calls the model it puts the slot tensors where the slot
modules read them:

- LoRA and BitFit: the base Linear / Conv1D (for LoRA also Embedding) is wrapped, computing base(x) + Δb + attach's
  LoRA path, (x Aᵀ) Bᵀ with the scale folded into B.
- Prefix tuning: the attention modules read their prefix keys and values from the slots through the same
  prefix-aware attention function attach uses (:mod:`adapterkit.attach.prefix`: prepended, mask grown by p columns
  every query may attend), and the tokens take positions p..p+n-1 (spec/SPEC.md §6.4). Keys and values are plain
  tensors, not transformers caches, which the exporter handles badly.
- ``full`` tensors: the base parameter is parametrized (torch.nn.utils.parametrize) to return the fed tensor.

With each slot at its default (r = 0, p = 0, Δb = 0, base tensor) the module computes exactly the base model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.utils import parametrize

from adapterkit.attach.lora import embedding_low_rank, linear_low_rank
from adapterkit.attach.prefix import prepend, token_positions, use_prefix_attention
from adapterkit.errors import AdapterError
from adapterkit.onnx.slots import module_of, role_of


class SlotValues:
    """The slot tensors of the current call, shared by the slot modules (a plain object: torch.export copies dict
    attributes of modules while tracing, which would unshare them)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def update(self, pairs) -> None:
        self._tensors.update(pairs)


class SlotModule(nn.Module):
    """A base Linear, Conv1D or Embedding plus a LoRA slot and/or a BitFit slot (not on an Embedding, which has no
    bias), read from the shared ``values``; the LoRA path is attach's (:mod:`adapterkit.attach.lora`)."""

    def __init__(self, base: nn.Module, values: SlotValues, lora: str | None, bias: str | None):
        super().__init__()
        self.base = base
        self.values = values
        self.lora, self.bias = lora, bias
        self.low_rank = embedding_low_rank if isinstance(base, nn.Embedding) else linear_low_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.lora is not None:
            y = y + self.low_rank(x, self.values[f"{self.lora}.lora_A"], self.values[f"{self.lora}.lora_B"])
        if self.bias is not None:
            y = y + self.values[f"{self.bias}.bias_delta"]
        return y


class FedTensor(nn.Module):
    """A parametrization that replaces a base parameter by the tensor fed into slot ``name``."""

    def __init__(self, values: SlotValues, name: str):
        super().__init__()
        self.values, self.name = values, name

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.values[self.name]


class SlotPrefix:
    """The prefix keys and values of one attention module, read from the slots: what attach's
    :class:`~adapterkit.attach.prefix.PrefixKV` is for attached adapters, seen by the same attention function."""

    def __init__(self, values: SlotValues, module: str):
        self.values, self.module = values, module

    @property
    def length(self):
        return self.values[f"{self.module}.prefix_key"].shape[1]

    def extend(self, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None):
        return prepend([self.values[f"{self.module}.prefix_key"]], [self.values[f"{self.module}.prefix_value"]],
                       key, value, attention_mask)


def task_output(output) -> torch.Tensor:
    """The tensor an exported graph returns: ``logits`` for LMs and classifiers, else ``last_hidden_state``."""
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise AdapterError(f"the model returns {type(output).__name__}, which has neither logits nor last_hidden_state")


def output_name(model: nn.Module) -> str:
    """A bare transformers model (its own ``base_model``: BertModel, LlamaModel) returns hidden states; a model
    with a head (ForCausalLM, LMHeadModel, ForSequenceClassification) returns logits."""
    return "last_hidden_state" if getattr(model, "base_model", None) is model else "logits"


class ExportableModel(nn.Module):
    """``forward(input_ids, attention_mask, *slot tensors in the order of slot_names)`` -> the task output."""

    def __init__(self, model: nn.Module, defaults: dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.slot_names = list(defaults)
        self.defaults = defaults
        self.values = SlotValues(defaults)
        self.prefixes: list[SlotPrefix] = []
        self._install()
        self.train(model.training)  # the slot modules are new: give them the mode of the model

    def _install(self) -> None:
        modules = dict(self.model.named_modules())
        by_module: dict[str, set[str]] = {}
        for name in self.slot_names:
            by_module.setdefault(module_of(name), set()).add(role_of(name))
        for module_name, roles in by_module.items():
            module = modules[module_name]
            if {"lora_A", "bias_delta"} & roles:
                linear_like = hasattr(module, "weight") and module.weight.ndim == 2
                if "lora_A" in roles and not linear_like:
                    raise AdapterError(f"{module_name} is a {type(module).__name__}: only Linear, Conv1D and "
                                       "Embedding modules take LoRA slots in an ONNX export")
                if "bias_delta" in roles and (not linear_like or isinstance(module, nn.Embedding)):
                    raise AdapterError(f"{module_name} is a {type(module).__name__}: only Linear and Conv1D "
                                       "modules take BitFit slots in an ONNX export")
                wrapped = SlotModule(module, self.values, module_name if "lora_A" in roles else None,
                                     module_name if "bias_delta" in roles else None)
                parent, _, child = module_name.rpartition(".")
                setattr(modules[parent] if parent else self.model, child, wrapped)
            if "prefix_key" in roles:
                module.prefix = SlotPrefix(self.values, module_name)
                self.prefixes.append(module.prefix)
            for parameter in roles - {"lora_A", "lora_B", "bias_delta", "prefix_key", "prefix_value"}:
                parametrize.register_parametrization(module, parameter,
                                                     FedTensor(self.values, f"{module_name}.{parameter}"))
        if self.prefixes:
            use_prefix_attention(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *slots: torch.Tensor) -> torch.Tensor:
        self.values.update(zip(self.slot_names, slots))
        kwargs = {"use_cache": False} if "use_cache" in self.model.config.to_dict() else {}
        if self.prefixes:  # tokens take positions p..p+n-1, as attach gives them (spec/SPEC.md §6.4)
            p = functools.reduce(torch.sym_max, (prefix.length for prefix in self.prefixes))
            kwargs["position_ids"] = token_positions(input_ids.shape[1], input_ids.device) + p
        return task_output(self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs))

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Eager forward with every slot at its default (no adapter, or the merged model)."""
        with torch.no_grad():
            return self(input_ids, attention_mask, *(self.defaults[n] for n in self.slot_names))


def slot_defaults(model: nn.Module, examples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The value of each slot when no adapter fills it: empty LoRA (r = 0) and prefix (p = 0), zero Δb, the base
    tensor for ``full``. ``examples`` (one fed tensor per slot, by slot name) give the fixed dims."""
    parameters = dict(model.named_parameters())
    defaults = {}
    for name in sorted(examples):
        role, example = role_of(name), examples[name]
        if role == "lora_A":
            defaults[name] = torch.zeros(0, example.shape[1])
        elif role == "lora_B":
            defaults[name] = torch.zeros(example.shape[0], 0)
        elif role in ("prefix_key", "prefix_value"):
            defaults[name] = torch.zeros(example.shape[0], 0, example.shape[2])
        elif role == "bias_delta":
            defaults[name] = torch.zeros(example.shape)
        elif name in parameters:
            defaults[name] = parameters[name].detach().float().clone()
        else:
            raise AdapterError(f"the adapter brings {name}, which this model has no parameter for")
    return defaults
