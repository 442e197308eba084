"""Full tensors that training adds or replaces whole, such as a new task head (PEFT's ``modules_to_save``).
A target is a module path; its roles are that module's parameter names (``weight``, ``bias``); each tensor replaces
the base's tensor of the same name, or adds it where the base has none."""

from __future__ import annotations

from adapterkit.kinds import Kind


class Full(Kind):
    name = "full"
    roles = None

    def check(self, component, tensors) -> None:
        # Every target holds at least one tensor (checked by the reader); any shape is allowed.
        return None

    def weight_deltas(self, component, tensors):
        return iter(())

    def replacements(self, component, tensors):
        for target in component.targets:
            for parameter, tensor in tensors[target].items():
                yield target, parameter, tensor
