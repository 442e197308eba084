"""New, untrained adapters for a model: which modules each method targets, and how its tensors start.

- LoRA (Hu et al. 2021): A ~ kaiming-uniform(a=√5) as ``nn.Linear`` initialises weights, B = 0, so ΔW = B·A = 0 and
  the model starts as the base (PEFT's default init).
- BitFit (Ben Zaken et al. 2022): every Δb = 0.
- Prefix tuning (Li & Liang 2021): small random keys and values (N(0, 0.02²)); near-zero keys make the prefix
  attract little attention at first, so the model starts close to the base.
- Full fine-tuning: every parameter, starting from the base values.
- The task head: modules the checkpoint did not have (a new classifier) are trained in full and saved as a ``full``
  component, starting from their fresh initialisation.
"""

from __future__ import annotations

import math

import torch
from transformers.pytorch_utils import Conv1D

from adapterkit.adapter import tensor_name
from adapterkit.errors import AdapterError
from adapterkit.manifest import Component

METHODS = ("lora", "bitfit", "prefix", "full")
HEAD = "head"
#: LoRA targets per architecture (module-name suffixes), as PEFT's defaults
LORA_TARGETS = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}
PREFIX_STD = 0.02


def _matches(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _outside(name: str, head: list[str]) -> bool:
    return not any(name == h or name.startswith(h + ".") for h in head)


def lora_targets(model: torch.nn.Module, suffixes=None, head: list[str] = ()) -> list[str]:
    if suffixes is None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in LORA_TARGETS:
            raise AdapterError(f"no default LoRA targets for model type {model_type!r}: pass --targets")
        suffixes = LORA_TARGETS[model_type]
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and _matches(name, suffixes) and _outside(name, head)]


def bitfit_targets(model: torch.nn.Module, suffixes=None, head: list[str] = ()) -> list[str]:
    """Modules with a bias (all of them, or those matching ``suffixes``). A model without biases (Llama) gets one
    on every linear layer of its blocks, starting at zero."""
    names = [name for name, module in model.named_modules() if _outside(name, head)
             and (suffixes is None or _matches(name, suffixes)) and isinstance(getattr(module, "bias", None), torch.Tensor)]
    if names or suffixes is not None:
        return names
    output = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output and _outside(name, head)]


def attention_modules(model: torch.nn.Module, suffixes=None, head: list[str] = ()) -> list[str]:
    """The modules that call the attention function: those whose class name ends in ``Attention`` and that hold no
    such module themselves (``LlamaAttention``, ``GPT2Attention``, ``BertSelfAttention`` but not ``BertAttention``)."""
    def is_attention(module):
        return type(module).__name__.endswith("Attention")

    return [name for name, module in model.named_modules()
            if is_attention(module) and not any(is_attention(m) for m in list(module.modules())[1:])
            and (suffixes is None or _matches(name, suffixes)) and _outside(name, head)]


def full_targets(model: torch.nn.Module, head: list[str] = ()) -> list[str]:
    """Every module that owns parameters directly."""
    return [name for name, module in model.named_modules()
            if any(True for _ in module.parameters(recurse=False)) and _outside(name, head)]


def new_components(model: torch.nn.Module, method: str, *, targets=None, rank: int = 8, alpha: float = 16.0,
                   prefix_length: int = 8, head: list[str] = (),
                   generator: torch.Generator | None = None) -> tuple[list[Component], dict[str, torch.Tensor]]:
    """The method's component (named after it) and its initial tensors, plus a ``head`` component for ``head``."""
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    if method == "lora":
        names = lora_targets(model, targets, head)
        for name in names:
            module = modules[name]
            in_features, out_features = module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1]
            a = torch.empty(rank, in_features)
            bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=√5) on a [rank, in] matrix, as nn.Linear does
            tensors[tensor_name(method, name, "lora_A")] = a.uniform_(-bound, bound, generator=generator)
            tensors[tensor_name(method, name, "lora_B")] = torch.zeros(out_features, rank)
        component = Component(method, "lora", names, {"rank": rank, "alpha": alpha, "scaling": "standard",
                                              "fan_in_fan_out": False})
        component.target_params = {n: {"fan_in_fan_out": True} for n in names if isinstance(modules[n], Conv1D)}
    elif method == "bitfit":
        names = bitfit_targets(model, targets, head)
        for name in names:
            tensors[tensor_name(method, name, "bias")] = torch.zeros(_output_size(modules[name]))
        component = Component(method, "bitfit", names, {})
    elif method == "prefix":
        names = attention_modules(model, targets, head)
        config = model.config
        heads = getattr(config, "num_attention_heads")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        for name in names:
            for role in ("prefix_key", "prefix_value"):
                tensors[tensor_name(method, name, role)] = torch.randn(
                    kv_heads, prefix_length, head_dim, generator=generator) * PREFIX_STD
        component = Component(method, "prefix", names, {"prefix_length": prefix_length})
    elif method == "full":
        names = full_targets(model, head)
        tensors.update(_parameters(modules, names, method))
        component = Component(method, "full", names, {})
    else:
        raise AdapterError(f"unknown training method {method!r} (known: {', '.join(METHODS)})")
    if not names:
        raise AdapterError(f"no module of this model matches the {method} targets {list(targets or [])}")
    components = [component]
    if head:
        components.append(Component(HEAD, "full", list(head), {}))
        tensors.update(_parameters(modules, head, HEAD))
    return components, tensors


def _parameters(modules: dict, names, component: str) -> dict[str, torch.Tensor]:
    return {tensor_name(component, name, parameter): value.detach().to("cpu", torch.float32, copy=True)
            for name in names for parameter, value in modules[name].named_parameters(recurse=False)}


def _output_size(module: torch.nn.Module) -> int:
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        return bias.shape[0]
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]

