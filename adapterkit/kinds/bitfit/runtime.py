"""BitFit in torch: the module's output gets w·Δb added along its last dimension, which is what adding Δb to the bias
does (Ben Zaken et al. 2022) without touching the base's bias; a module with no bias works the same (its bias is
zero). Merge adds w·Δb to the bias; unmerge subtracts it. Training starts from Δb = 0 on every module with a bias (a
model without biases, such as Llama, gets one on every linear layer of its blocks, starting at zero)."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from adapterkit import targets
from adapterkit.arrays import to_torch
from adapterkit.errors import RequestError
from adapterkit.kinds.runtime import Runtime, in_dtype


def output_size(module: torch.nn.Module) -> int | None:
    """The size of the module's output's last dimension, where its parameters tell it."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        return bias.shape[0]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    return weight.shape[1] if isinstance(module, (Conv1D, torch.nn.Embedding)) else weight.shape[0]


def _has_bias(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


class BitFitRuntime(Runtime):
    merged_parameters = ("bias",)

    def after(self, base, x, y, tensors, scale):
        return in_dtype(y + (tensors["bias"] if scale == 1.0 else tensors["bias"] * scale), y.dtype)

    def check_fits(self, module, path, component, target, roles) -> None:
        from adapterkit.attach.wrapper import innermost

        size, delta = output_size(innermost(module)), roles["bias"]
        if size is not None and size != delta.shape[0]:
            raise RequestError(f"component {component.name!r}, target {target!r}: bias delta is {list(delta.shape)} "
                               f"but {path} gives outputs of size {size}")

    def merge(self, component, target, roles, parameter, tensor, weight):
        tensor.add_(to_torch(roles["bias"]).to(tensor.dtype), alpha=weight)

    def unmerge(self, component, target, roles, parameter, tensor, weight, record):
        tensor.add_(to_torch(roles["bias"]).to(tensor.dtype), alpha=-weight)

    def candidates(self, model, head):
        return [name for name, module in model.named_modules() if targets.outside(name, head)
                and (_has_bias(module) or isinstance(module, targets.linear_types()))]

    def default_targets(self, model, head):
        with_bias = [name for name, module in model.named_modules()
                     if _has_bias(module) and targets.outside(name, head)]
        return with_bias or targets.linear_modules(model, head)

    def initial(self, model, names, options, generator):
        return {}, {}, {name: {"bias": torch.zeros(output_size(model.get_submodule(name)))} for name in names}


RUNTIME = BitFitRuntime()
