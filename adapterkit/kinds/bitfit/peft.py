"""BitFit in PEFT's files: PEFT has no BitFit method, but a LoRA adapter saved with ``bias="all"`` or
``"lora_only"`` carries the *trained* biases (``<target>.base_layer.bias`` for a LoRA-wrapped module, ``<module>.bias``
otherwise). Our ``bitfit`` holds Δb = trained − base, so both directions need the base model."""

from __future__ import annotations

import numpy as np

from adapterkit.errors import RequestError
from adapterkit.io.checkpoint import Checkpoint
from adapterkit.manifest import Component
from adapterkit.targets import resolve_module

#: the PEFT types whose files can carry biases
RIDES_ON = ("LORA",)


def read(config: dict, tensors: dict[str, np.ndarray], context: dict) -> list[tuple[Component, dict]]:
    biases = {key.rpartition(".")[0].removesuffix(".base_layer"): tensors.pop(key)
              for key in list(tensors) if key.endswith(".bias")}
    if not biases:
        return []
    base = context.get("base")
    if base is None:
        raise RequestError(f'bias="{config.get("bias")}": PEFT stores trained biases, adapterkit the change to the '
                           "base biases; pass the base model (--base) to compute it")
    deltas = {target: {"bias": trained.astype(np.float32) - base_bias.astype(np.float32)}
              for target, trained, base_bias in _with_base_biases(biases, base)}
    return [(Component("bias", "bitfit", sorted(deltas)), deltas)]


def write(component: Component, tensors: dict, config: dict, context: dict) -> dict[str, np.ndarray]:
    base = context.get("base")
    if base is None:
        raise RequestError("PEFT stores trained biases, adapterkit the change to the base biases: pass the base "
                           "model (--base) to compute them")
    wrapped = context.get("wrapped", set())
    config["bias"] = "lora_only" if set(component.targets) <= wrapped else "all"
    deltas = {t: roles["bias"].astype(np.float32) * np.float32(component.weight) for t, roles in tensors.items()}
    out = {}
    for target, delta, base_bias in _with_base_biases(deltas, base):
        key = f"{target}.base_layer.bias" if target in wrapped else f"{target}.bias"
        out[key] = (base_bias.astype(np.float32) + delta).astype(base_bias.dtype)
    return out


def _with_base_biases(biases: dict[str, np.ndarray], base):
    with Checkpoint(base) as checkpoint:
        modules = {name.rpartition(".")[0] for name in checkpoint.names()}
        for target, tensor in biases.items():
            module = resolve_module(target, modules)
            if module is None or f"{module}.bias" not in checkpoint:
                raise RequestError(f"the base has no bias for {target!r}")
            yield target, tensor, np.array(checkpoint.get(f"{module}.bias"))
