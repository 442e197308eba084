"""BitFit, unmerged: the wrapped module's output gets Σᵢ wᵢ·Δbᵢ added along its last dimension, which is what adding
Δb to the bias does (Ben Zaken et al. 2022) without touching the base's bias; a module with no bias works the same
(its bias is zero). The deltas are parameters of the wrapper, ``bias_delta[<adapter index>_<component name>]``."""

from __future__ import annotations

import torch

from adapterkit.attach.wrapper import AdapterWrapper
from adapterkit.errors import AdapterError


class BitFitWrapper(AdapterWrapper):
    def __init__(self, base: torch.nn.Module):
        super().__init__(base)
        self.bias_delta = torch.nn.ParameterDict()
        self.scales: dict[str, float] = {}

    def add(self, key: str, delta: torch.nn.Parameter, scaling: float) -> None:
        self.bias_delta[key], self.scales[key] = delta, scaling

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.base(*args, **kwargs)
        for key, delta in self.bias_delta.items():
            out = out + delta * self.scales[key]
        return out


def attach(handle, index: int, component, tensors, weight: float) -> None:
    for target in component.targets:
        path = handle.resolve(component.name, target)
        module = handle.model.get_submodule(path)
        delta = tensors[target]["bias"]
        bias = getattr(module, "bias", None)
        like = bias if isinstance(bias, torch.Tensor) else getattr(module, "weight", None)
        if isinstance(bias, torch.Tensor) and bias.shape != delta.shape:
            raise AdapterError(f"component {component.name!r}, target {target!r}: bias delta is {list(delta.shape)} "
                               f"but {path}.bias is {list(bias.shape)}")
        wrapper = handle.wrapper(path, BitFitWrapper)
        wrapper.add(f"{index}_{component.name}", handle.parameter(index, f"{component.name}.{target}.bias", delta, like),
                    weight)
