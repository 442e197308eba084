"""What a kind of adapter is: the :class:`Kind` contract that each package of :mod:`adapterkit.kinds` fulfils.

A kind has two halves, kept apart so that the format layer never imports a deep-learning framework:

- this class (numpy only): the manifest parameters and tensor rules, how components of the kind compose, what
  ``inspect`` says about them, and the training options it reads;
- its *runtime* (``<package>/runtime.py``, torch; loaded on first use through :attr:`Kind.runtime`): the forward
  function used by attach and by the ONNX export alike, the weight math of merge and its inverse, the training
  initialisation and the default targets on a model. Its contract is :class:`adapterkit.kinds.runtime.Runtime`.

Its mapping to PEFT's files, when PEFT has the kind, lives in ``<package>/peft.py`` (:attr:`Kind.peft`).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Mapping, Sequence

import numpy as np

from adapterkit.errors import RequestError
from adapterkit.manifest import Component

#: {target: {role: tensor}} of one component
Tensors = Mapping[str, Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TrainOption:
    """A hyper-parameter that ``train`` takes for a kind (shared by name across kinds: ``--rank`` is LoRA's and
    DoRA's). ``kind`` is ``count`` (an integer ≥ 1) or ``number`` (a finite float in ``[low, high]``)."""

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None


@dataclasses.dataclass
class Part:
    """One component of one input to a composition, with the weight it enters the composite with."""

    source: str  #: the input's name, for messages
    component: Component
    tensors: dict[str, dict[str, np.ndarray]]  #: {target: {role: tensor}}
    weight: float  #: the input's weight times the component's weight

    @property
    def where(self) -> str:
        return f"{self.source} (component {self.component.name!r})"


@dataclasses.dataclass
class CompositionRequest:
    """How a composition was asked for: the method (for kinds whose composition has several, LoRA) and its options."""

    method: str = "concat"
    rank: int | None = None
    tol: float | None = None
    density: float | None = None
    seed: int = 0
    #: TIES: what the agreeing sum is divided by (count, weights, none; :mod:`adapterkit.compose.methods`)
    normalise: str = "count"


@dataclasses.dataclass
class Composed:
    """One kind's part of a composite: its component, tensors ({target: {role: tensor}}) and, for an approximation,
    the error record (spec §8)."""

    component: Component
    tensors: dict[str, dict[str, np.ndarray]]
    error: dict | None = None


class Kind(abc.ABC):
    """Per-kind rules. A subclass sets the class attributes and implements :meth:`check`; it overrides the rest
    where its kind does something."""

    #: the manifest's ``kind``
    name: str = ""
    #: one line for help texts
    summary: str = ""
    #: tensor roles a target of this kind holds; ``None`` means any parameter name (``full``)
    roles: tuple[str, ...] | None = ()
    #: whether a component may have a weight other than 1, and why not
    weighted: bool = True
    unweighted_reason: str = ""
    #: whether its tensors replace base tensors whole (they are then not part of the base the adapter belongs to)
    replaces: bool = False
    #: why it cannot be folded into base weights (None: it can be merged)
    unmergeable: str | None = None
    #: whether ``train --method <name>`` trains it, its default learning rate, and the options it reads
    trainable: bool = True
    default_lr: float = 1e-3
    train_options: tuple[TrainOption, ...] = ()

    # -- format: tensor rules (numpy) -------------------------------------------------------------------------------

    @abc.abstractmethod
    def check(self, component: Component, tensors: Tensors) -> None:
        """Raise FormatError (no path) if the tensors of ``component`` ({target: {role: tensor}}) break its rules."""

    def parameter_count(self, component: Component, tensors: Tensors) -> int:
        return sum(int(t.size) for roles in tensors.values() for t in roles.values())

    # -- inspect ----------------------------------------------------------------------------------------------------

    def describe(self, component: Component, tensors: Tensors) -> dict:
        """Fields this kind adds to a component's entry in ``inspect --json``."""
        return {}

    def detail(self, entry: dict) -> str:
        """What this kind adds to a component's line in ``inspect`` (from its :meth:`describe` entry)."""
        return ""

    # -- composition --------------------------------------------------------------------------------------------------

    def compose(self, parts: Sequence[Part], request: CompositionRequest, name: str) -> Composed:
        """Combine the components of this kind of every input (each with its weight) into one component ``name``."""
        raise RequestError(f"components of kind {self.name!r} cannot be composed")

    # -- merge --------------------------------------------------------------------------------------------------------

    def unmergeable_reason(self, component: Component) -> str:
        return (f"component {component.name!r} is a {self.name} adapter: {self.unmergeable}; attach it "
                "(adapterkit.attach) or export it unmerged (adapterkit export --onnx --unmerged) instead")

    def replaced_targets(self, component: Component) -> list[str]:
        """Base modules whose tensors the component brings whole (not part of the base it belongs to)."""
        return list(component.targets) if self.replaces else []

    # -- the other halves, loaded on first use ------------------------------------------------------------------------

    @property
    def runtime(self):
        """The kind's torch half (:class:`adapterkit.kinds.runtime.Runtime`)."""
        runtime = _load(f"{type(self).__module__}.runtime").RUNTIME
        runtime.kind = self.name
        return runtime

    @property
    def peft(self):
        """The kind's mapping to PEFT's files (a module), or None when PEFT has no such kind."""
        try:
            return _load(f"{type(self).__module__}.peft")
        except ModuleNotFoundError as exc:
            if exc.name != f"{type(self).__module__}.peft":
                raise
            return None


def _load(module: str):
    return importlib.import_module(module)
