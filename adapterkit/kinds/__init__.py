"""The registry of adapter kinds.

Each kind lives in one module of this package and says, in one place, what tensors a component of that kind holds
(:meth:`Kind.check`) and what it does to the base model's weights (:meth:`Kind.add_delta`). Adding a kind means
adding one module here and registering it below.
"""

from __future__ import annotations

import abc

from typing import Iterator, Mapping

import torch

from adapterkit.errors import AdapterError
from adapterkit.manifest import Component


class Kind(abc.ABC):
    """Per-kind rules. Subclasses set ``name`` and ``roles``, implement :meth:`check`, and override the rest where
    their kind does something else."""

    name: str = ""
    #: tensor roles a target of this kind holds; ``None`` means any parameter name (``full``)
    roles: tuple[str, ...] | None = ()

    @abc.abstractmethod
    def check(self, component: Component, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Raise AdapterError (no path) if the tensors of ``component`` ({target: {role: tensor}}) break its rules."""

    #: the parameter of a target module that a target's delta lands on (``weight``, ``bias``); ``None`` for kinds
    #: that change no weights by addition (prefix, full)
    delta_parameter: str | None = None

    def unmergeable_reason(self, component: Component) -> str:
        """Why a component of this kind cannot be added to the base weights."""
        return f"a {self.name} component cannot be folded into the base weights"

    def delta_shape(self, component: Component, target: str, roles: Mapping[str, torch.Tensor]) -> list[int]:
        """The shape of one target's delta: that of the base parameter it lands on, in its stored layout."""
        raise AdapterError(self.unmergeable_reason(component))

    def add_delta(self, component: Component, target: str, roles: Mapping[str, torch.Tensor],
                  out: torch.Tensor) -> None:
        """Add one target's delta, times the component's weight, to ``out`` in place: the base parameter it lands on,
        as float32 in its stored layout. Done in place so a merge needs no second tensor of the parameter's size."""
        raise AdapterError(self.unmergeable_reason(component))

    def weight_deltas(
        self, component: Component, tensors: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Yield ``(target, parameter, delta)``: each target's delta on its own, a new float32 tensor in the base
        tensor's stored layout, already multiplied by the component's weight."""
        if self.delta_parameter is None:
            raise AdapterError(self.unmergeable_reason(component))
        for target in component.targets:
            delta = torch.zeros(self.delta_shape(component, target, tensors[target]))
            self.add_delta(component, target, tensors[target], delta)
            yield target, self.delta_parameter, delta

    def replacements(
        self, component: Component, tensors: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Yield ``(target, parameter, tensor)``: base tensors that the component replaces whole (or adds)."""
        return iter(())

    def parameter_count(self, component: Component, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
        return sum(t.numel() for roles in tensors.values() for t in roles.values())


def _registry() -> dict[str, Kind]:
    from adapterkit.kinds.bitfit import BitFit
    from adapterkit.kinds.full import Full
    from adapterkit.kinds.lora import LoRA
    from adapterkit.kinds.prefix import Prefix

    return {kind.name: kind for kind in (LoRA(), BitFit(), Prefix(), Full())}


KINDS: dict[str, Kind] = _registry()


def get_kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise AdapterError(f"unknown adapter kind {name!r} (known: {', '.join(sorted(KINDS))})") from None
