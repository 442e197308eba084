"""Adapter slots: the adapter tensors an unmerged ONNX graph takes as inputs, and what each adapter feeds into them.

One slot is one graph input, named after the base module it acts on, the kind and the role it holds:

    <module>.lora.lora_A        [r, in]            r is a dynamic dim: r = 0 means "no LoRA here"
    <module>.lora.lora_B        [out, r]           the scale s·w already folded in
    <module>.bitfit.bias        [out]              zeros when unused
    <module>.prefix.prefix_key  [kv_heads, p, d]   p is a dynamic dim: p = 0 means "no prefix"
    <module>.dora.magnitude     [out]              with DoRA's lora_A/lora_B; ‖W‖ when unused (the base)
    <module>.ia3.ia3_l          [out]              (IA)³ output scaling (ia3_l_ff [in]: input scaling); ones when unused
    <module>.adapter.down       [b, d]             a bottleneck adapter (with down_bias, up, up_bias, non_linearity);
                                                   b is a dynamic dim: b = 0 means "no adapter here"
    <module>.full.<parameter>   base shape         a ``full`` component's tensor (e.g. a classification head)

Each kind says what it feeds (:meth:`~adapterkit.kinds.runtime.Runtime.fold`: its tensors with its scale and the
adapter's weight folded in), how several adapters' feeds on one module make one slot
(:meth:`~adapterkit.kinds.runtime.Runtime.combine`, for LoRA exact along the rank:
Σ sᵢ Bᵢ Aᵢ = [s₁B₁ … sₙBₙ] · [A₁; …; Aₙ]) and what an absent adapter is (:meth:`~adapterkit.kinds.runtime.Runtime.empty`).
Folding lets one graph serve adapters of any rank, alpha and scaling rule. The exporter, the ``.onnx_adapter``
writer and the converter share this module.
"""

from __future__ import annotations

import torch

from adapterkit.adapter import Adapter
from adapterkit.errors import RequestError
from adapterkit.kinds import get_kind
from adapterkit.targets import resolve_module


def slot_name(module: str, kind: str, role: str) -> str:
    return f"{module}.{kind}.{role}"


def split_slot(name: str) -> tuple[str, str, str]:
    """``"a.b.lora.lora_A"`` -> ``("a.b", "lora", "lora_A")``."""
    rest, _, role = name.rpartition(".")
    module, _, kind = rest.rpartition(".")
    return module, kind, role


def adapter_feeds(adapter: Adapter, weight: float = 1.0, model: torch.nn.Module | None = None
                  ) -> dict[str, torch.Tensor]:
    """The float32 tensors ``adapter`` feeds into the slots, by slot name, its scales and ``weight`` folded in.

    ``model`` (the base, or its meta-device skeleton) resolves targets written for a wrapped or unwrapped model and
    checks that each target's tensors fit its module; without it, targets are taken as module names."""
    modules = None if model is None else {name for name, _ in model.named_modules()}
    feeds: dict[str, list[torch.Tensor]] = {}
    for component in adapter.components:
        kind = get_kind(component.kind)
        factor = component.weight * weight
        if not kind.weighted and factor != 1.0:
            raise RequestError(f"component {component.name!r} is a {kind.name}: it cannot be weighted "
                               f"({kind.unweighted_reason}; weight {factor:g}); export it with weight 1")
        runtime = kind.runtime
        tensors = adapter.component_tensors(component.name)
        for target in component.targets:
            module = target if modules is None else resolve_module(target, modules)
            if module is None:
                raise RequestError(f"component {component.name!r}: target {target!r} is not a module of the base")
            if model is not None:
                runtime.check_fits(model.get_submodule(module), module, component, target, tensors[target])
            for role, tensor in runtime.fold(component, target, tensors[target], factor).items():
                if not bool(torch.isfinite(tensor).all()):
                    raise RequestError(f"component {component.name!r}, target {target!r}: {role} times its scale is "
                                       "not finite in float32 (the weight or alpha is too large)")
                feeds.setdefault(slot_name(module, kind.name, role), []).append(tensor)
    return {name: get_kind(split_slot(name)[1]).runtime.combine(split_slot(name)[2], parts).contiguous()
            for name, parts in feeds.items()}


def check_slots(slots) -> None:
    """Refuse slots that cannot share one graph: a slot whose empty value is computed from a base parameter
    (:attr:`~adapterkit.kinds.runtime.Runtime.empty_reads`, DoRA's magnitude ‖W‖) beside a slot of a kind that
    replaces that parameter (``full``): with the replacement active, the "empty" DoRA would rescale the new weight."""
    replaced = {(module, role): kind for module, kind, role in map(split_slot, slots) if get_kind(kind).replaces}
    for module, kind, _ in map(split_slot, slots):
        for parameter in get_kind(kind).runtime.empty_reads:
            if (module, parameter) in replaced:
                raise RequestError(f"{module}: a {kind} adapter and a {replaced[module, parameter]} adapter that "
                                   f"replaces its {parameter} "
                                   f"cannot share one graph (the {kind} slot's empty value is computed from the base "
                                   f"{parameter}): export them into separate graphs")
