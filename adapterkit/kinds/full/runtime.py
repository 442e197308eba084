"""Full tensors in torch (a task head, PEFT's ``modules_to_save``): each takes the place of the module's parameter of
the same name through a parametrization (``torch.nn.utils.parametrize``) that returns the entry's tensor, or becomes a
new parameter where the module has none (a bias the base lacked). Detach removes the parametrization, which gives
the module its own parameter object back, or removes the added one. Merge copies the tensor over the base's; it
cannot be unmerged (the base's tensor is gone from the merged weights).

In a per-row attach a parameter cannot be replaced for some rows only: the module's output is recomputed with the
entry's tensors on its rows instead (:class:`ReplacedOnRows`).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from adapterkit import targets
from adapterkit.arrays import to_torch
from adapterkit.attach.rows import EACH_ROW
from adapterkit.attach.wrapper import ADAPTER_PARAMETER, Derived, innermost
from adapterkit.errors import RequestError
from adapterkit.kinds.runtime import Runtime, in_dtype


class Replaced(torch.nn.Module):
    """A parametrization that replaces a module's parameter by an entry's tensor of that name."""

    def __init__(self, source, name: str):
        super().__init__()
        self.name = name
        if isinstance(source, torch.nn.Module):
            self.adapter = source
        self.source = source

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        # in the dtype the module computes in (a float32 tensor over a base in bfloat16 is used in bfloat16; over a
        # base weight held quantized or in bfloat16 while the model computes in float32, in float32)
        return in_dtype(self.source.tensors()[self.name], _compute_dtype(original))


def _compute_dtype(original: torch.Tensor) -> torch.dtype:
    from adapterkit.precision import is_held

    return torch.float32 if is_held(original) else original.dtype


def _aliases(model: torch.nn.Module, parameter: torch.nn.Parameter) -> list[tuple[torch.nn.Module, str]]:
    """Every (module, attribute) that holds ``parameter``."""
    return [(module, name) for module in model.modules() for name, held in module._parameters.items()
            if held is parameter]


def _unparametrize(module: torch.nn.Module, name: str, order: list[str]) -> None:
    """Remove the parametrization of ``name``: the module gets its own parameter object back, in its old place
    among the module's parameters (so ``named_parameters()`` and state dicts keep their order)."""
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    parameters = module._parameters
    restored = [(key, parameters[key]) for key in order if key in parameters]
    restored += [(key, value) for key, value in parameters.items() if key not in order]
    parameters.clear()
    parameters.update(restored)


class FullRuntime(Runtime):
    def fold(self, component, target, roles, weight):
        return {role: to_torch(array).float() for role, array in roles.items()}

    def combine(self, role, tensors):
        if len(tensors) > 1:
            raise RequestError(f"two components replace the same {role!r} tensor of one module: keep one")
        return tensors[0]

    def empty(self, role, example, module):
        return getattr(innermost(module), role).detach().float().clone()

    def check_fits(self, module, path, component, target, roles) -> None:
        module = innermost(module)
        for name, tensor in roles.items():
            where = f"component {component.name!r}: {path}.{name}"
            if name in module._parameters:
                original = module._parameters[name]
                if original is not None and list(original.shape) != list(tensor.shape):
                    raise RequestError(f"{where} is {list(original.shape)}, the adapter's tensor {list(tensor.shape)}")
            elif hasattr(module, name):
                raise RequestError(f"{where} exists and is not a parameter: it cannot be replaced")

    def install(self, handle, path, key, source, scale, component=None, target=None) -> None:
        module = innermost(handle.model.get_submodule(path))
        if getattr(source, "selection", None) is not None or getattr(source, "each_row", False):
            return self._install_per_row(handle, path, key, source, module)
        for name in source.tensors():
            original = module._parameters.get(name)
            if original is not None:
                # a tied parameter (GPT-2's head is its embedding) is replaced under every name it has, as in a
                # checkpoint, which stores it once
                for owner, attribute in _aliases(handle.model, original):
                    order = list(owner._parameters)
                    parametrize.register_parametrization(owner, attribute, Replaced(source, name), unsafe=True)
                    handle.on_detach(lambda owner=owner, attribute=attribute, order=order:
                                     _unparametrize(owner, attribute, order))
            else:  # the base has no such tensor: the entry's becomes the module's own
                tensor = source.tensors()[name]
                if not isinstance(tensor, torch.nn.Parameter):
                    raise RequestError(f"{path}.{name} is not in the base model: it cannot be fed as a graph input")
                setattr(tensor, ADAPTER_PARAMETER, True)
                had_slot = name in module._parameters
                setattr(module, name, tensor)
                handle.on_detach(lambda name=name, had_slot=had_slot: (
                    module.register_parameter(name, None) if had_slot else delattr(module, name)))

    def _install_per_row(self, handle, path, key, source, module) -> None:
        """A per-row attach (or an ONNX adapter bank, whose tensors have a row each): an entry on the module (and on every module sharing a tied parameter) that recomputes
        its output with the adapter's tensors on the adapter's rows (:class:`ReplacedOnRows`)."""
        owners = {id(m): name for name, m in handle.model.named_modules(remove_duplicate=False)}
        for name in source.tensors():
            original = module._parameters.get(name)
            aliases = _aliases(handle.model, original) if original is not None else [(module, name)]
            for owner, attribute in aliases:
                renamed = Derived(source, lambda tensors, name=name, attribute=attribute: {attribute: tensors[name]})
                wrapper = handle.wrapper(owners[id(owner)])
                wrapper.add(f"{key}_{attribute}", ON_ROWS, renamed, 1.0)
                if isinstance(source, torch.nn.Module):  # its parameters belong to the model (state dict, .to(device))
                    wrapper.adapters[key] = source

    # Merging replaces the tensor: the merge plan copies it in place of the base's (see adapterkit.merge).

    def candidates(self, model, head):
        """Every module that owns a parameter, counting a tied parameter once (GPT-2's head shares the embedding)."""
        owners = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
        return [name for name, _ in model.named_modules() if name in owners and targets.outside(name, head)]

    def initial(self, model, names, options, generator):
        from adapterkit.precision import dense

        tensors = {name: {parameter: dense(value.detach(), torch.float32).to("cpu", copy=True)
                          for parameter, value in model.get_submodule(name).named_parameters(recurse=False)}
                   for name in names}
        return {}, {}, tensors


class ReplacedOnRows(Runtime):
    """The per-row form of a replaced parameter: y + f(x; tensors) − f(x) on the entry's rows, where f is the module's
    own forward and f(x; tensors) the same with the entry's tensors in place of its parameters (the difference, so
    that what other entries on the module added stays)."""

    def after(self, base, x, y, tensors, scale):
        module = innermost(base)
        return y + torch.func.functional_call(module, dict(tensors), (x,)) - module(x)

    def after_rows(self, base, x, y, tensors, scale, rows):
        """With a row's tensors per row (an ONNX adapter bank): an embedding or a linear layer computed with each
        row's own weight as one gather or batched product (vectorising them row by row would fix the batch size in
        the exported graph); any other module row by row, as every kind."""
        module = innermost(base)
        if rows is not EACH_ROW or not isinstance(module, (torch.nn.Embedding, torch.nn.Linear, Conv1D)):
            return super().after_rows(base, x, y, tensors, scale, rows)
        weight = tensors.get("weight", module.weight)
        if weight.ndim == module.weight.ndim:  # only the bias is replaced: the base weight, for every row
            weight = weight.expand(x.shape[0], *weight.shape)
        if isinstance(module, torch.nn.Embedding):  # row b looks its tokens up in its own table
            replaced = weight[torch.arange(x.shape[0], device=x.device)[:, None], x.reshape(x.shape[0], -1)]
        else:
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            replaced = torch.bmm(flat, weight if isinstance(module, Conv1D) else weight.transpose(1, 2))
            bias = tensors.get("bias", module.bias)
            if bias is not None:
                replaced = replaced + (bias[:, None] if bias.ndim == 2 else bias)
        return y + replaced.reshape(y.shape) - module(x)


RUNTIME = FullRuntime()
ON_ROWS = ReplacedOnRows()
ON_ROWS.kind = "full"
