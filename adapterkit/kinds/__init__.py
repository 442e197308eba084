"""The registry of adapter kinds.

Each kind lives in one module of this package and says, in one place, what tensors a component of that kind holds
(:meth:`Kind.check`) and what it does to the base model's weights (:meth:`Kind.weight_deltas`). Adding a kind means
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

    def weight_deltas(
        self, component: Component, tensors: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Yield ``(target, parameter, delta)``: what to add to ``<target>.<parameter>`` of the base, in the base
        tensor's stored layout, in float32, already multiplied by the component's weight."""
        raise AdapterError(f"a {self.name} component cannot be folded into the base weights")

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
