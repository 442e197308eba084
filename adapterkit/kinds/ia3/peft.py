"""(IA)³ in PEFT's files (``peft_type: IA3``): ``<target>.ia3_l`` is our ``ia3_l``.

PEFT keeps an output target's vector as [out, 1] and a feed-forward target's as [1, in] (``IA3Layer.update_layer``);
ours are 1-D. Which targets are feed-forward PEFT's config says in ``feedforward_modules`` (a list of name suffixes, or
a regex the whole module name must match), by the rule of ``IA3Model._check_target_module_feedforward``; the
vector's shape must agree. ``fan_in_fan_out`` (the weight stored [in, out], for merging) comes from the base's module
types when the base is given (PEFT itself sets it per module: Conv1D or not), else from the config. A component
weight is folded into the vectors.
"""

from __future__ import annotations

import re

import numpy as np

from adapterkit.errors import FormatError
from adapterkit.kinds.ia3 import ROLE, fan_in_fan_out, feedforward
from adapterkit.manifest import Component

PEFT_TYPE = "IA3"
SUFFIX = f".{ROLE}"


def empty_config() -> dict:
    return {"peft_type": PEFT_TYPE, "task_type": None, "target_modules": [], "feedforward_modules": [],
            "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}


def read(config: dict, tensors: dict[str, np.ndarray], context: dict) -> list[tuple[Component, dict]]:
    """Take the (IA)³ vectors out of ``tensors`` (PEFT keys without ``base_model.model.``) as one component."""
    found = {key[: -len(SUFFIX)]: tensors.pop(key) for key in list(tensors) if key.endswith(SUFFIX)}
    if not found:
        return []
    held, flags = {}, {}
    layouts = _layouts(list(found), context.get("base"), bool(config.get("fan_in_fan_out")))
    for target, vector in found.items():
        if vector.ndim != 2 or 1 not in vector.shape:
            raise FormatError(f"(IA)³ vector of {target!r} is {list(vector.shape)}: only those of Linear and Conv1D "
                              "modules ([out, 1] or [1, in]) are supported")
        by_config = _configured_feedforward(config.get("feedforward_modules"), target)
        by_shape = None if vector.shape == (1, 1) else vector.shape[0] == 1
        if by_config is not None and by_shape is not None and by_config != by_shape:
            raise FormatError(f"(IA)³ vector of {target!r} is {list(vector.shape)}, which is "
                              f"{'' if by_shape else 'not '}a feed-forward vector's shape, but feedforward_modules "
                              f"says it is {'' if by_config else 'not '}one")
        held[target] = {ROLE: vector.reshape(-1)}
        flags[target] = {"feedforward": bool(by_shape if by_config is None else by_config),
                         "fan_in_fan_out": layouts[target]}
    params = {"feedforward": False, "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
    target_params = {t: o for t, f in flags.items() if (o := {k: v for k, v in f.items() if v != params[k]})}
    return [(Component("ia3", "ia3", sorted(held), params, target_params), held)]


def _configured_feedforward(modules, target: str) -> bool | None:
    """PEFT's rule: a regex string must match the whole module name; a list entry must end it (no dot needed)."""
    if isinstance(modules, str):
        return re.fullmatch(modules, target) is not None
    if isinstance(modules, (list, tuple)):
        return any(target.endswith(suffix) for suffix in modules if isinstance(suffix, str))
    return None


def _layouts(names: list[str], base, default: bool) -> dict[str, bool]:
    """Whether each target's base weight is stored [in, out]: from the base's module types, else ``default``."""
    if base is None:
        return dict.fromkeys(names, default)
    from transformers.pytorch_utils import Conv1D

    from adapterkit.targets import resolve_module, skeleton

    modules = dict(skeleton(base).named_modules())
    return {name: isinstance(modules.get(resolve_module(name, modules) or name), Conv1D) for name in names}


def write(component: Component, tensors: dict, config: dict, context: dict) -> dict[str, np.ndarray]:
    """PEFT's keys for one (IA)³ component, filling ``config``."""
    ff = [t for t in component.targets if feedforward(component, t)]
    others = [t for t in component.targets if not feedforward(component, t)]
    # PEFT tests feedforward_modules entries as bare suffixes: where one would also end another target's name, a
    # regex over the exact names says it instead
    clash = any(o.endswith(f) for o in others for f in ff)
    config.update(target_modules=list(component.targets),
                  feedforward_modules="|".join(re.escape(t) for t in ff) if clash and ff else ff,
                  fan_in_fan_out=any(fan_in_fan_out(component, t) for t in component.targets))
    out = {}
    for target, roles in tensors.items():
        vector = roles[ROLE]
        if component.weight != 1:
            vector = vector.astype(np.float32) * np.float32(component.weight)
        out[f"{target}{SUFFIX}"] = vector.reshape(1, -1) if feedforward(component, target) else vector.reshape(-1, 1)
    return out
