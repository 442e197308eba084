"""Fold adapters into a base model's weights, and take them out again.

Merging applies each component's weight math to the base tensors it changes, in float32 — for LoRA W ← W + w·s·B·A,
for BitFit b ← b + w·Δb, each kind's :meth:`~adapterkit.kinds.runtime.Runtime.merge` — and puts the whole tensors of
a kind that replaces (``full``) in place of the base's. Unmerging applies each kind's inverse, last first. This module
only decides *which* base tensor each target lands on (:class:`MergePlan`) and applies it to a model in memory
(:func:`merge_into_model`); :mod:`adapterkit.merge_checkpoint` applies the same plan to a checkpoint on disk.

Several adapters with weights w₁…wₙ: for kinds that add, the result is exactly what composing them first would give
(Σ wᵢ ΔWᵢ, no approximation). Every changed tensor is checked finite before it is used; a weight or alpha so large
that the result overflows is refused, naming the tensor.

A ``full`` component cannot be unmerged: the base tensors it replaced are gone from the merged weights, so unmerging
one is refused (merge again from the base instead).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from adapterkit.adapter import Adapter
from adapterkit.arrays import to_torch
from adapterkit.errors import RequestError
from adapterkit.fingerprints import check_base
from adapterkit.kinds import get_kind, order
from adapterkit.manifest import Component
from adapterkit.io.pipeline import split_target
from adapterkit.targets import resolve_module
from adapterkit.values import check_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Part:
    """One target of one component: the unit whose math is applied to a base tensor."""

    runtime: object
    component: Component
    target: str
    roles: Mapping[str, np.ndarray]
    weight: float  #: the adapter's weight times the component's
    key: str  #: names what its merge needs kept for its inverse (``<adapter>/<component>.<target>.<parameter>``)


class MergePlan:
    """Which base tensors the adapters change, resolved against the base's tensor names.

    ``names`` are the base's tensor names (checkpoint keys or parameter names). ``sign`` is +1 to merge, -1 to
    unmerge. Nothing is computed up front: :meth:`apply` changes one base tensor when it meets it, so memory stays at a
    few tensors however large the model. ``kept`` (unmerge) is what the merge returned for the kinds whose inverse
    needs it; after a merge, :attr:`kept` holds it.
    """

    def __init__(self, adapters: Sequence[Adapter], weights: Sequence[float] | None, names: Iterable[str],
                 sign: float = 1.0, kept: Mapping[str, dict[str, torch.Tensor]] | None = None,
                 component: str | None = None, components: Iterable[str] = ()):
        weights = check_weights(weights, len(adapters))
        self.names = set(names)
        self.sign = sign
        #: the pipeline component these tensors are (``unet``), and the names of all of the pipeline's components:
        #: targets named after another component (``text_encoder.…``) are not this checkpoint's (see
        #: :mod:`adapterkit.io.pipeline`); they are counted in :attr:`elsewhere`
        self.component = component
        self.components = set(components) | ({component} if component else set())
        self.elsewhere: dict[str, int] = {}
        self.kept: dict[str, dict[str, torch.Tensor]] = dict(kept or {})
        modules = {name.rpartition(".")[0] for name in self.names}
        #: base tensor name -> the parts that change it, in merge order, until applied
        self._parts: dict[str, list[_Part]] = {}
        #: base tensor name -> tensor that replaces it (full components)
        self.replacements: dict[str, np.ndarray] = {}
        #: tensors a full component adds where the base has none, by name
        self.additions: dict[str, np.ndarray] = {}
        for index, (adapter, weight) in enumerate(zip(adapters, weights)):
            for component in adapter.components:
                self._add_component(index, adapter, component, weight * component.weight, modules)

    def _here(self, targets: Sequence[str]) -> list[tuple[str, str]]:
        """``(target, name in this checkpoint)`` of the targets that land here: all of them, or in a pipeline
        component's checkpoint those named after it (without the name); the others are counted in ``elsewhere``."""
        found = []
        for target in targets:
            owner, rest = split_target(target, self.components)
            if owner is None or owner == self.component:
                found.append((target, rest))
            else:
                self.elsewhere[owner] = self.elsewhere.get(owner, 0) + 1
        return found

    def _add_component(self, index, adapter, component, weight, modules) -> None:
        kind = get_kind(component.kind)
        tensors = adapter.component_tensors(component.name)
        if kind.replaces:
            if self.sign < 0:
                raise RequestError(
                    f"component {component.name!r} ({component.kind}) replaced whole base tensors when it was merged; "
                    "the originals are not in the merged weights, so it cannot be unmerged: merge again from the base")
            for target, local in self._here(component.targets):
                module = resolve_module(local, modules)
                for parameter, tensor in tensors[target].items():
                    name = f"{module or local}.{parameter}"
                    (self.replacements if name in self.names else self.additions)[name] = tensor
            return
        if kind.unmergeable:
            raise RequestError(kind.unmergeable_reason(component))
        runtime = kind.runtime
        for target, local in self._here(component.targets):
            module = resolve_module(local, modules)
            if module is None:
                raise RequestError(f"component {component.name!r}: target {target!r} is not a module of the base")
            for parameter in runtime.merged_parameters:
                if parameter in runtime.optional_parameters and f"{module}.{parameter}" not in self.names:
                    continue
                self._parts.setdefault(f"{module}.{parameter}", []).append(_Part(
                    runtime, component, target, tensors[target], weight,
                    f"{index}/{component.name}.{target}.{parameter}"))

    @property
    def empty(self) -> bool:
        """Whether no target of the adapters lands in this checkpoint."""
        return not (self._parts or self.replacements or self.additions)

    def touches(self, name: str) -> bool:
        return name in self.replacements or name in self._parts

    def apply(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """The new value of base tensor ``name`` (given its current value), in ``dtype`` (default: its own).

        Changed tensors are computed in float32 (float64 for a float64 tensor), in ``out`` when given (a float32 tensor of the same shape that the
        caller reuses, so that streaming a checkpoint allocates no new memory per tensor). A result that is not
        finite (in float32, or once cast to ``dtype``) is refused."""
        dtype = dtype or tensor.dtype
        if name in self.replacements:  # a full tensor takes the base's place; deltas on the same tensor act on it
            replacement = to_torch(self.replacements.pop(name))
            if replacement.shape != tensor.shape:
                raise RequestError(f"{name}: the adapter's tensor is {list(replacement.shape)}, "
                                   f"the base's is {list(tensor.shape)}")
            tensor = replacement
        # kinds act in the registry's order, attach order within a kind (as attached entries run)
        parts = sorted(self._parts.pop(name, ()), key=lambda part: order(part.runtime.kind))
        if not parts:
            return tensor if tensor.dtype == dtype or not tensor.is_floating_point() else tensor.to(dtype)
        compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32  # at least float32 (spec §6.1)
        result = torch.empty(tensor.shape, dtype=compute) if out is None else out
        result.copy_(tensor)
        parameter = name.rpartition(".")[2]
        for part in (parts if self.sign > 0 else reversed(parts)):
            if self.sign > 0:
                kept = part.runtime.merge(part.component, part.target, part.roles, parameter, result, part.weight)
                if kept:
                    self.kept[part.key] = kept
            else:
                part.runtime.unmerge(part.component, part.target, part.roles, parameter, result, part.weight,
                                     self.kept.get(part.key))
        stored = result if dtype == result.dtype else result.to(dtype)
        if not bool(torch.isfinite(stored).all()):
            stage = "merged" if self.sign > 0 else "unmerged"
            where = "" if dtype == result.dtype else " in " + str(dtype).removeprefix("torch.")
            raise RequestError(f"{name}: the {stage} tensor would hold NaN or Inf{where} (a weight or alpha too "
                               "large?); nothing was written")
        return stored

    def check_done(self) -> None:
        """After every base tensor went through :meth:`apply`: refuse changes that found no tensor to land on."""
        if self._parts:
            raise RequestError(f"the adapter changes {sorted(self._parts)[0]}, which the base does not have "
                               "(a bias on a module without one cannot be merged)")


def merge_into_model(model: torch.nn.Module, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
                     force: bool = False) -> torch.nn.Module:
    """Fold ``adapters`` (each times its weight) into ``model``'s parameters in place; returns the model. What the
    inverse needs (for kinds that keep something) is left in ``model.adapterkit_kept``."""
    for number, adapter in enumerate(adapters, 1):
        check_base(adapter, model, f"adapter {number}", force)
    plan = MergePlan(adapters, weights, _parameter_names(model))
    _apply_to_model(model, plan)
    if plan.kept:
        model.adapterkit_kept = plan.kept
    return model


def unmerge_from_model(model: torch.nn.Module, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
                       ) -> torch.nn.Module:
    """Undo what :func:`merge_into_model` did (same adapters and weights); returns the model."""
    kept = getattr(model, "adapterkit_kept", None)
    _apply_to_model(model, MergePlan(adapters, weights, _parameter_names(model), sign=-1.0, kept=kept))
    return model


def _parameter_names(model: torch.nn.Module) -> list[str]:
    """Every name a parameter has, tied ones too (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)."""
    return [name for name, _ in model.named_parameters(remove_duplicate=False)]


def _apply_to_model(model: torch.nn.Module, plan: MergePlan) -> None:
    if plan.additions:
        raise RequestError(f"the adapter brings {sorted(plan.additions)[0]}, which this model has no parameter for")
    changed: dict[int, str] = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if not plan.touches(name):
                continue
            if id(parameter) in changed:  # one tensor under two names: changing it twice would be wrong
                raise RequestError(f"{name} is the same tensor as {changed[id(parameter)]} (tied weights): the "
                                   "adapter changes both names; target one of them")
            parameter.copy_(plan.apply(name, parameter))  # refused before it is copied if not finite
            changed[id(parameter)] = name
    plan.check_done()
