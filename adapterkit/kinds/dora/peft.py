"""DoRA in PEFT's files: a LoRA adapter (``peft_type: LORA``) saved with ``use_dora: true``.

The factors are LoRA's keys (``<target>.lora_A.weight`` [r, in], ``<target>.lora_B.weight`` [out, r]; embeddings
``lora_embedding_A/B``), read and written by the lora package's mapping; the magnitude is
``<target>.lora_magnitude_vector`` [out] (PEFT ≥ 0.12 saves it without a ``.weight`` suffix; an embedding's has one
entry per embedding dimension). PEFT's DoRA is ours as is: the same norm per output row, the same scale rules.
"""

from __future__ import annotations

import numpy as np

from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.lora import peft as lora_peft
from adapterkit.manifest import Component

PEFT_TYPE = "LORA"
MAGNITUDE = ".lora_magnitude_vector"


def claims(config: dict) -> bool:
    """A LORA config with ``use_dora`` set is DoRA's."""
    return bool(config.get("use_dora"))


def empty_config() -> dict:
    return {**lora_peft.empty_config(), "use_dora": True}


def read(config: dict, tensors: dict[str, np.ndarray], context: dict) -> list[tuple[Component, dict]]:
    """Take the DoRA tensors out of ``tensors`` (PEFT keys without ``base_model.model.``) as one component."""
    magnitudes = {key[: -len(MAGNITUDE)]: tensors.pop(key) for key in list(tensors) if key.endswith(MAGNITUDE)}
    found = lora_peft.read({**config, "use_dora": False}, tensors, context)  # the factors, LoRA's options checked
    held = found[0][1] if found else {}
    for target in sorted(set(held) | set(magnitudes)):
        if target not in magnitudes:
            raise FormatError(f"DoRA target {target!r} lacks its lora_magnitude_vector")
        if target not in held:
            raise FormatError(f"DoRA target {target!r} has a lora_magnitude_vector but no lora_A and lora_B")
        held[target]["magnitude"] = magnitudes[target]
    if not held:
        return []
    factors = found[0][0]
    return [(Component("dora", "dora", factors.targets, factors.params, factors.target_params), held)]


def write(component: Component, tensors: dict, config: dict, context: dict) -> dict[str, np.ndarray]:
    """PEFT's keys for one DoRA component, filling ``config``."""
    if component.weight != 1:
        raise RequestError(f"component {component.name!r} is a dora with weight {component.weight:g}, which PEFT "
                           "cannot express (a DoRA component cannot be weighted)")
    factors = Component(component.name, "lora", list(component.targets), component.params, component.target_params)
    out = lora_peft.write(factors, {target: {role: roles[role] for role in ("lora_A", "lora_B")}
                                    for target, roles in tensors.items()}, config, context)
    config["use_dora"] = True
    out.update({f"{target}{MAGNITUDE}": roles["magnitude"] for target, roles in tensors.items()})
    return out
