"""Full tensors that training adds or replaces whole, such as a new task head (PEFT's ``modules_to_save``).

A target is a module path; its roles are that module's parameter names (``weight``, ``bias``); each tensor replaces
the base's tensor of the same name, or adds it where the base has none. A replaced tensor has no weighted effect
(weight 1 only), and its targets are not part of the base the adapter belongs to (the fingerprint leaves them out).
Composition keeps each tensor once; two inputs may bring the same tensor only if it is identical.
"""

from __future__ import annotations

import numpy as np

from adapterkit.errors import RequestError
from adapterkit.kinds.base import Composed, Kind
from adapterkit.manifest import Component


class Full(Kind):
    name = "full"
    summary = "whole tensors that replace the base's (a task head)"
    roles = None
    weighted = False
    unweighted_reason = "a replaced tensor has no weighted effect"
    replaces = True
    default_lr = 1e-4

    def check(self, component, tensors) -> None:
        return None  # every target holds at least one tensor (checked by the reader); any shape is allowed

    def compose(self, parts, request, name) -> Composed:
        held: dict[str, dict[str, np.ndarray]] = {}
        owner = {}
        params: dict = {}
        for part in parts:
            if part.weight != 1:
                raise RequestError(f"{part.where} holds full tensors with weight {part.weight:g}: a replaced tensor "
                                   "cannot be weighted; give its input weight 1")
            params.update(part.component.params)
            for target in part.component.targets:
                for parameter, tensor in part.tensors[target].items():
                    known = held.setdefault(target, {}).get(parameter)
                    if known is not None and not (known.shape == tensor.shape and np.array_equal(known, tensor)):
                        raise RequestError(f"{owner[target, parameter].where} and {part.where} bring different "
                                           f"{target}.{parameter} tensors: refusing to pick one")
                    held[target][parameter], owner[target, parameter] = tensor, part
        return Composed(Component(name, self.name, list(held), params), held)
