"""Fold adapters into a base model's weights, and take them out again.

Merging adds each component's weight deltas (W ← W + ΔW for LoRA, b ← b + Δb for BitFit) and puts the whole tensors
of a ``full`` component in place of the base's. Unmerging subtracts the same deltas. The per-kind math lives in
:mod:`adapterkit.kinds`; this module only decides *which* base tensor each delta lands on (:class:`MergePlan`) and
applies it, in float32, to a model in memory (:func:`merge_into_model`). :mod:`adapterkit.merge_checkpoint` applies
the same plan to a checkpoint on disk, shard by shard.

Several adapters with weights w₁…wₙ: each adapter's deltas are multiplied by its weight and added, which is exactly
what composing them first would give (Σ wᵢ ΔWᵢ, no approximation).

A ``full`` component cannot be unmerged: the base tensors it replaced are gone from the merged weights, so unmerging
one is refused (merge again from the base instead).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Sequence

import torch

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError
from adapterkit.fingerprint import check_base
from adapterkit.kinds import get_kind
from adapterkit.manifest import Component

log = logging.getLogger(__name__)


def resolve_module(target: str, modules: set[str]) -> str | None:
    """The base module a target names: itself, or, when the adapter was made on a model with (or without) a wrapper
    prefix (``model.layers.0.q_proj`` vs ``layers.0.q_proj``), the unique module that differs by one leading
    segment. ``None`` when nothing matches; AdapterError when several do."""
    if target in modules:
        return target
    candidates = set()
    _, _, without_head = target.partition(".")
    if without_head in modules:
        candidates.add(without_head)
    depth = target.count(".") + 1
    candidates.update(m for m in modules if m.endswith("." + target) and m.count(".") == depth)
    if len(candidates) > 1:
        raise AdapterError(f"target {target!r} is ambiguous in the base: it could be {' or '.join(sorted(candidates))}")
    return candidates.pop() if candidates else None


@dataclasses.dataclass
class _Part:
    """One target of one component (its weight times the adapter's folded in): the unit whose delta is added."""

    component: Component
    target: str
    roles: dict[str, torch.Tensor]


class MergePlan:
    """Which base tensors the adapters change, resolved against the base's tensor names.

    ``names`` are the base's tensor names (checkpoint keys or parameter names). ``sign`` is +1 to merge, -1 to
    unmerge. Nothing is computed up front: :meth:`apply` adds the deltas to one base tensor when it meets it, so
    memory stays at a few tensors however large the model.
    """

    def __init__(self, adapters: Sequence[Adapter], weights: Sequence[float] | None, names: Iterable[str],
                 sign: float = 1.0):
        weights = _weights(adapters, weights)
        self.names = set(names)
        modules = {name.rpartition(".")[0] for name in self.names}
        #: base tensor name -> the parts whose deltas land on it, until applied
        self._parts: dict[str, list[_Part]] = {}
        #: base tensor name -> tensor that replaces it (full components)
        self.replacements: dict[str, torch.Tensor] = {}
        #: tensors a full component adds where the base has none, by name
        self.additions: dict[str, torch.Tensor] = {}
        for adapter, weight in zip(adapters, weights):
            for component in adapter.components:
                self._add_component(adapter, component, weight * sign, modules, sign)

    def _add_component(self, adapter, component, weight, modules, sign) -> None:
        kind = get_kind(component.kind)
        tensors = adapter.component_tensors(component.name)
        replaced = list(kind.replacements(component, tensors))
        if replaced:
            if sign < 0:
                raise AdapterError(
                    f"component {component.name!r} ({component.kind}) replaced whole base tensors when it was merged; "
                    "the originals are not in the merged weights, so it cannot be unmerged: merge again from the base"
                )
            for target, parameter, tensor in replaced:
                module = resolve_module(target, modules)
                name = f"{module or target}.{parameter}"
                (self.replacements if name in self.names else self.additions)[name] = tensor
            return
        if kind.delta_parameter is None:
            raise AdapterError(kind.unmergeable_reason(component))
        weighted = dataclasses.replace(component, weight=component.weight * weight)
        for target in component.targets:
            module = resolve_module(target, modules)
            if module is None:
                raise AdapterError(f"component {component.name!r}: target {target!r} is not a module of the base")
            self._parts.setdefault(f"{module}.{kind.delta_parameter}", []).append(
                _Part(weighted, target, tensors[target]))

    def touches(self, name: str) -> bool:
        return name in self.replacements or name in self._parts

    def apply(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """The new value of base tensor ``name`` (given its current value), in ``dtype`` (default: its own).

        Changed tensors are computed in float32, in ``out`` when given (a float32 tensor of the same shape that the
        caller reuses, so that streaming a checkpoint allocates no new memory per tensor)."""
        dtype = dtype or tensor.dtype
        if name in self.replacements:  # a full tensor takes the base's place; deltas on the same tensor add to it
            replacement = self.replacements.pop(name)
            if replacement.shape != tensor.shape:
                raise AdapterError(f"{name}: the adapter's tensor is {list(replacement.shape)}, "
                                   f"the base's is {list(tensor.shape)}")
            tensor = replacement
        parts = self._parts.pop(name, ())
        if not parts:
            return tensor if tensor.dtype == dtype or not tensor.is_floating_point() else tensor.to(dtype)
        result = torch.empty(tensor.shape) if out is None else out
        result.copy_(tensor)
        for part in parts:
            kind = get_kind(part.component.kind)
            shape = kind.delta_shape(part.component, part.target, part.roles)
            if list(shape) != list(tensor.shape):
                raise AdapterError(f"{name}: the adapter's delta is {list(shape)}, the base tensor is "
                                   f"{list(tensor.shape)}")
            kind.add_delta(part.component, part.target, part.roles, result)
        return result if dtype == torch.float32 else result.to(dtype)

    def check_done(self) -> None:
        """After every base tensor went through :meth:`apply`: refuse deltas that found no tensor to land on."""
        if self._parts:
            raise AdapterError(f"the adapter changes {sorted(self._parts)[0]}, which the base does not have "
                               "(a bias on a module without one cannot be merged)")


def _weights(adapters: Sequence[Adapter], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise AdapterError(f"{len(weights)} weights given for {len(adapters)} adapters")
    return [float(w) for w in weights]


def merge_into_model(model: torch.nn.Module, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
                     force: bool = False) -> torch.nn.Module:
    """Fold ``adapters`` (each times its weight) into ``model``'s parameters in place; returns the model."""
    for number, adapter in enumerate(adapters, 1):
        check_base(adapter, model, f"adapter {number}", force)
    _apply_to_model(model, MergePlan(adapters, weights, dict(model.named_parameters())))
    return model


def unmerge_from_model(model: torch.nn.Module, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
                       ) -> torch.nn.Module:
    """Subtract what :func:`merge_into_model` added (same adapters and weights); returns the model."""
    _apply_to_model(model, MergePlan(adapters, weights, dict(model.named_parameters()), sign=-1.0))
    return model


def _apply_to_model(model: torch.nn.Module, plan: MergePlan) -> None:
    if plan.additions:
        raise AdapterError(f"the adapter brings {sorted(plan.additions)[0]}, which this model has no parameter for")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if plan.touches(name):
                parameter.copy_(plan.apply(name, parameter))
    plan.check_done()

