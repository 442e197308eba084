"""New, untrained adapters for a model: which modules a method targets, and how its tensors start.

A method is a kind (``train --method lora`` trains a ``lora`` component): its runtime chooses the default targets
on the model's structure and the starting tensors (:meth:`~adapterkit.kinds.runtime.Runtime.initial`; LoRA starts at
ΔW = 0, BitFit at Δb = 0, a prefix near zero, ``full`` at the base's values). ``--targets`` suffixes pick among the
modules the kind can act on instead.

The task head: modules the checkpoint did not have (a new classifier) are trained whole and saved as a component of
the kind that replaces tensors, starting from their fresh initialisation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adapterkit.adapter import tensor_name
from adapterkit.errors import RequestError
from adapterkit.kinds import KINDS, get_kind, trainable_kinds
from adapterkit.manifest import Component

HEAD = "head"


def _matches(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def choose_targets(model: torch.nn.Module, method: str, suffixes: Sequence[str] | None,
                   head: Sequence[str] = ()) -> list[str]:
    """The modules ``method`` trains: its defaults on this model, or those of its candidates matching ``suffixes``."""
    runtime = get_kind(method).runtime
    if suffixes is None:
        names = runtime.default_targets(model, head)
    else:
        names = [name for name in runtime.candidates(model, head) if _matches(name, suffixes)]
    if not names:
        raise RequestError(f"no module of this model can take {method}"
                           + (f" among those matching --targets {','.join(suffixes)}" if suffixes else ""))
    return names


def new_components(model: torch.nn.Module, method: str, *, targets: Sequence[str] | None = None,
                   options: Mapping | None = None, head: Sequence[str] = (),
                   generator: torch.Generator | None = None) -> tuple[list[Component], dict[str, torch.Tensor]]:
    """The method's component (named after it) and its initial tensors, plus a ``head`` component for ``head``."""
    if method not in trainable_kinds():
        raise RequestError(f"unknown training method {method!r} (known: {', '.join(trainable_kinds())})")
    names = choose_targets(model, method, targets, head)
    generator = generator or torch.Generator().manual_seed(0)
    params, target_params, initial = get_kind(method).runtime.initial(model, names, dict(options or {}), generator)
    components = [Component(method, method, list(initial), params, target_params)]
    tensors = {tensor_name(method, target, role): value for target, roles in initial.items()
               for role, value in roles.items()}
    if head:
        replacing = next(kind for kind in KINDS.values() if kind.replaces)
        _, _, head_tensors = replacing.runtime.initial(model, list(head), {}, generator)
        components.append(Component(HEAD, replacing.name, list(head), {}))
        tensors.update({tensor_name(HEAD, target, role): value for target, roles in head_tensors.items()
                        for role, value in roles.items()})
    return components, tensors


def option_defaults() -> dict[str, object]:
    """Every training option any trainable kind reads, with its default (one entry per name)."""
    return {option.name: option.default for kind in KINDS.values() if kind.trainable
            for option in kind.train_options}
