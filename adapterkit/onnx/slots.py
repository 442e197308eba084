"""Adapter slots: the adapter tensors an unmerged ONNX graph takes as inputs, and what each adapter feeds into them.

One slot is one graph input, named after the base module it acts on and what it holds:

    <module>.lora_A       [r, in]            LoRA down-projection; r is a dynamic dim, r = 0 means "no LoRA here"
    <module>.lora_B       [out, r]           LoRA up-projection with the scale s·w already folded in
    <module>.bias_delta   [out]              BitFit Δb, zeros when unused
    <module>.prefix_key   [kv_heads, p, d]   prefix tuning keys; p is a dynamic dim, p = 0 means "no prefix"
    <module>.prefix_value [kv_heads, p, d]
    <module>.<parameter>  base shape         a ``full`` component's tensor (e.g. a classification head)

Folding the LoRA scale s = α/r (or α/√r) and the adapter weight w into B lets one graph serve adapters of any rank,
alpha and scaling rule: the graph computes base(x) + (x Aᵀ) Bᵀ. Several LoRA components on one module concatenate
along the rank axis, which is exact: Σ sᵢ Bᵢ Aᵢ = [s₁B₁ … sₙBₙ] · [A₁; …; Aₙ].

This module is plain tensor math (no ONNX): the exporter, the ``.onnx_adapter`` writer and the converter share it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError
from adapterkit.kinds import get_kind
from adapterkit.kinds.lora import scale
from adapterkit.merge import resolve_module

#: slot role -> index of its dynamic axis (None: a fixed shape)
DYNAMIC_AXIS = {"lora_A": 0, "lora_B": 1, "bias_delta": None, "prefix_key": 1, "prefix_value": 1}


def slot_name(module: str, role: str) -> str:
    return f"{module}.{role}"


def adapter_feeds(adapter: Adapter, weight: float = 1.0, modules: Iterable[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The float32 tensors ``adapter`` feeds into the slots, by slot name, its scales and ``weight`` folded in.

    ``modules`` (the base's module names) resolves targets written for a wrapped or unwrapped model; without it,
    targets are taken as module names."""
    modules = None if modules is None else set(modules)
    feeds: dict[str, list[torch.Tensor]] = {}

    def add(module: str, role: str, tensor: torch.Tensor) -> None:
        feeds.setdefault(slot_name(module, role), []).append(tensor.detach().float())

    for component in adapter.components:
        tensors = adapter.component_tensors(component.name)
        factor = component.weight * weight
        for target in component.targets:
            module = target if modules is None else resolve_module(target, modules)
            if module is None:
                raise AdapterError(f"component {component.name!r}: target {target!r} is not a module of the base")
            roles = tensors[target]
            if component.kind == "lora":
                a, b = roles["lora_A"], roles["lora_B"]
                s = scale(a.shape[0], component.param(target, "alpha"), component.param(target, "scaling", "standard"))
                add(module, "lora_A", a)
                add(module, "lora_B", b.float() * (s * factor))
            elif component.kind == "bitfit":
                add(module, "bias_delta", roles["bias"].float() * factor)
            elif component.kind == "prefix":
                if factor != 1.0:
                    raise AdapterError(f"component {component.name!r} is a prefix: it cannot be weighted "
                                       f"(weight {factor}); export it with weight 1")
                add(module, "prefix_key", roles["prefix_key"])
                add(module, "prefix_value", roles["prefix_value"])
            elif component.kind == "full":
                for parameter, tensor in roles.items():
                    add(module, parameter, tensor)
            else:
                get_kind(component.kind)  # an unknown kind raises its own error
                raise AdapterError(f"component {component.name!r}: kind {component.kind!r} cannot be exported to ONNX")
    return {name: _combine(name, parts) for name, parts in feeds.items()}


def _combine(name: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several components feeding one slot: LoRA stacks along the rank, BitFit adds, prefixes concatenate."""
    if len(parts) == 1:
        return parts[0].contiguous()
    role = name.rpartition(".")[2]
    if role == "bias_delta":
        return torch.stack(parts).sum(0)
    if role in DYNAMIC_AXIS:
        return torch.cat(parts, dim=DYNAMIC_AXIS[role]).contiguous()
    raise AdapterError(f"two components replace {name} whole: keep one")


def role_of(name: str) -> str:
    return name.rpartition(".")[2]


def module_of(name: str) -> str:
    return name.rpartition(".")[0]
