"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A target holds ``lora_A`` of shape [r, in] and ``lora_B`` of shape [out, r]; the weight delta is
ΔW = s·B·A with s = α/r (``scaling: standard``) or s = α/√r (``scaling: rslora``, Kalajdzievski 2023).
ΔW has the math layout [out, in]; when ``fan_in_fan_out`` is true the base stores the weight as [in, out]
(GPT-2's Conv1D, embeddings) and ΔWᵀ is added instead.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from adapterkit.errors import AdapterError
from adapterkit.kinds import Kind
from adapterkit.manifest import Component


def scale(rank: int, alpha: float, scaling: str = "standard") -> float:
    """s = α/r, or α/√r for rsLoRA."""
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    return alpha / rank


class LoRA(Kind):
    name = "lora"
    roles = ("lora_A", "lora_B")

    def check(self, component: Component, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for target in component.targets:
            a, b = tensors[target]["lora_A"], tensors[target]["lora_B"]
            where = f"component {component.name!r}, target {target!r}"
            if a.ndim != 2 or b.ndim != 2:
                raise AdapterError(f"{where}: lora_A and lora_B must be 2-D, got {list(a.shape)} and {list(b.shape)}")
            if a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"{where}: rank mismatch, lora_A is {list(a.shape)} (rank {a.shape[0]}) "
                    f"but lora_B is {list(b.shape)} (rank {b.shape[1]})"
                )
            rank = component.param(target, "rank")
            if rank != a.shape[0]:
                raise AdapterError(f"{where}: manifest says rank {rank} but lora_A is {list(a.shape)}")

    delta_parameter = "weight"

    def delta_shape(self, component, target, roles) -> list[int]:
        shape = [roles["lora_B"].shape[0], roles["lora_A"].shape[1]]
        return shape[::-1] if component.param(target, "fan_in_fan_out", False) else shape

    def add_delta(self, component, target, roles, out) -> None:
        """out += w·s·B·A (or its transpose), in one GEMM pass over ``out``: ΔW itself is never formed."""
        s = scale(roles["lora_A"].shape[0], component.param(target, "alpha"),
                  component.param(target, "scaling", "standard"))
        a, b = roles["lora_A"].float(), roles["lora_B"].float()
        if component.param(target, "fan_in_fan_out", False):
            out.addmm_(a.T, b.T, alpha=s * component.weight)  # ΔWᵀ = s·Aᵀ·Bᵀ
        else:
            out.addmm_(b, a, alpha=s * component.weight)
