"""Full tensors (a task head, PEFT's ``modules_to_save``): each takes the place of the module's parameter of the same
name, or becomes a new parameter where the module has none (a bias the base lacked). Detach puts the original
parameter objects back, or removes the added ones. Full tensors are not weighted: they replace, they do not add."""

from __future__ import annotations


from adapterkit.attach.wrapper import innermost
from adapterkit.errors import AdapterError


def attach(handle, index: int, component, tensors, weight: float) -> None:
    for target in component.targets:
        path = handle.resolve(component.name, target)
        module = innermost(handle.model.get_submodule(path))
        for name, tensor in tensors[target].items():
            where = f"component {component.name!r}: {path}.{name}"
            if name in module._parameters:
                original = module._parameters[name]
                if original is not None and original.shape != tensor.shape:
                    raise AdapterError(f"{where} is {list(original.shape)}, the adapter's tensor {list(tensor.shape)}")
                restore = lambda module=module, name=name, original=original: setattr(module, name, original)  # noqa: E731
            elif hasattr(module, name):
                raise AdapterError(f"{where} exists and is not a parameter: it cannot be replaced")
            else:
                original = None
                restore = lambda module=module, name=name: delattr(module, name)  # noqa: E731
            like = original if original is not None else next(module.parameters(), None)
            parameter = handle.parameter(index, f"{component.name}.{target}.{name}", tensor, like)
            setattr(module, name, parameter)
            handle.on_detach(restore)
