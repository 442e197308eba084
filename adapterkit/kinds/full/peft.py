"""Full tensors in PEFT's files: ``modules_to_save`` (a task head, saved whole) and targeted embedding layers saved
whole (``<target>.base_layer.weight``, PEFT's ``save_embedding_layers``) become one ``full`` component, and back."""

from __future__ import annotations

import numpy as np

from adapterkit.errors import RequestError
from adapterkit.manifest import Component

#: the PEFT types whose files can carry whole modules
RIDES_ON = ("LORA",)
#: whole modules hold biases too: read them before the kinds that take loose biases
CLAIMS_FIRST = True
#: submodules of PEFT's modules_to_save wrapper, whose tensors duplicate the saved module's or the base's
WRAPPER_COPIES = (".modules_to_save", ".original_module")


def read(config: dict, tensors: dict[str, np.ndarray], context: dict) -> list[tuple[Component, dict]]:
    saved_modules = config.get("modules_to_save") or []
    full: dict[str, dict[str, np.ndarray]] = {}
    for key in list(tensors):
        module, _, parameter = key.rpartition(".")
        if module.endswith(WRAPPER_COPIES):
            del tensors[key]  # bias="all" also saves the biases inside PEFT's modules_to_save wrapper: duplicates
        elif _is_saved_module(module, saved_modules):
            full.setdefault(module, {})[parameter] = tensors.pop(key)
        elif module.endswith(".base_layer") and parameter != "bias":  # a targeted embedding layer saved whole
            full.setdefault(module.removesuffix(".base_layer"), {})[parameter] = tensors.pop(key)
    if not full:
        return []
    return [(Component("saved_modules", "full", sorted(full)), full)]


def _is_saved_module(module: str, saved_modules: list[str]) -> bool:
    """As PEFT matches ``modules_to_save``: the tensor's module, or a module above it, has a name ending with one."""
    parts = module.split(".")
    return any(".".join(parts[:i]).endswith(name) for i in range(1, len(parts) + 1) for name in saved_modules)


def write(component: Component, tensors: dict, config: dict, context: dict) -> dict[str, np.ndarray]:
    if context.get("base") is not None:
        _refuse_tied(component, context["base"])
    # A LoRA target's own weights saved whole go under base_layer; any other module is a module to save.
    wrapped = context.get("wrapped", set())
    config["modules_to_save"] = [t for t in component.targets if t not in wrapped] or None
    out = {}
    for target, roles in tensors.items():
        module = f"{target}.base_layer" if target in wrapped else target
        out.update({f"{module}.{parameter}": tensor for parameter, tensor in roles.items()})
    return out


def _refuse_tied(component: Component, base) -> None:
    """PEFT's modules_to_save replaces a copy of one module: a parameter tied to another module's (GPT-2's embedding
    is its head) would keep its base value there, while adapterkit replaces the tensor under every name."""
    from adapterkit.targets import resolve_module, skeleton

    model = skeleton(base)
    modules = dict(model.named_modules())
    names = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for target in component.targets:
        module = modules.get(resolve_module(target, modules) or target)
        for parameter_name, parameter in (module.named_parameters(recurse=False) if module is not None else ()):
            if len(names[id(parameter)]) > 1:
                raise RequestError(f"{target}.{parameter_name} is one tensor under the names "
                                   f"{', '.join(names[id(parameter)])}: PEFT's modules_to_save would replace it "
                                   "under one name only")
