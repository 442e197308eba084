"""Attach adapters to a torch model in memory (unmerged, swappable, trainable) and detach them again.

    from adapterkit.attach import attach
    with attach(model, [support, legal], weights=[0.7, 0.3]) as handle:
        logits = model(input_ids).logits          # base + 0.7·support + 0.3·legal
    # the model is bit for bit the base again

Nothing is folded into the base weights: LoRA runs its low-rank path beside the base module, BitFit adds its bias
delta to the module's output, prefix tuning prepends key/value vectors inside attention, and ``full`` tensors take
the place of the base's parameters until detach puts the originals back. One module per kind in this package does the
work (:mod:`.lora`, :mod:`.bitfit`, :mod:`.prefix`, :mod:`.full`); this module checks the base, resolves target
names and keeps the list of changes that :meth:`AttachedAdapters.detach` undoes in reverse order.
"""

from __future__ import annotations

import copy
import importlib
import logging
from typing import Callable, Iterator, Sequence

import torch

from adapterkit.adapter import Adapter
from adapterkit.attach.wrapper import AdapterWrapper
from adapterkit.errors import AdapterError
from adapterkit.fingerprint import check_base
from adapterkit.merge import _weights, resolve_module

log = logging.getLogger(__name__)

__all__ = ["AttachedAdapters", "attach"]

#: kinds with a module of the same name in this package
ATTACHABLE = ("lora", "bitfit", "prefix", "full")


class AttachedAdapters:
    """What :func:`attach` returns: the adapters' live tensors, and the way back to the base model.

    ``tensors`` maps ``"<adapter index>/<tensor name>"`` to the ``nn.Parameter`` used in the forward pass (train it,
    or make it a graph input when exporting). Use it as a context manager to detach on exit.
    """

    def __init__(self, model: torch.nn.Module, adapters: Sequence[Adapter], trainable: bool):
        self.model = model
        self.adapters = list(adapters)
        self.trainable = trainable
        self.tensors: dict[str, torch.nn.Parameter] = {}
        self._modules = {name for name, _ in model.named_modules()}
        self._undo: list[Callable[[], None]] = []
        self._wrappers: dict[tuple[str, type], AdapterWrapper] = {}
        #: what a kind's module keeps for the length of this attach (the prefix module: its stores)
        self.shared: dict[str, object] = {}
        self.attached = True

    # -- used by the per-kind modules -------------------------------------------------------------------------------

    def resolve(self, component_name: str, target: str) -> str:
        """The model's module path for an adapter target (exact, else differing by the model's wrapper prefix)."""
        module = resolve_module(target, self._modules)
        if module is None:
            raise AdapterError(f"component {component_name!r}: target {target!r} is not a module of this model")
        return module

    def parameter(self, index: int, name: str, tensor: torch.Tensor, like: torch.Tensor | None) -> torch.nn.Parameter:
        """A fresh ``nn.Parameter`` holding a copy of an adapter tensor, on the device (and in the dtype) of
        ``like``, recorded in :attr:`tensors` under ``"<index>/<name>"``. The adapter's own tensor is never changed."""
        device = like.device if like is not None else None
        dtype = like.dtype if like is not None and like.is_floating_point() else tensor.dtype
        parameter = torch.nn.Parameter(tensor.detach().to(device=device, dtype=dtype, copy=True),
                                       requires_grad=self.trainable)
        self.tensors[f"{index}/{name}"] = parameter
        return parameter

    def wrapper(self, path: str, wrapper_type: type[AdapterWrapper]) -> AdapterWrapper:
        """The wrapper of ``wrapper_type`` this attach put around module ``path``, created and swapped in on first
        use (several adapters on one module share it, so their effects add up)."""
        key = (path, wrapper_type)
        if key not in self._wrappers:
            original = self.model.get_submodule(path)
            wrapper = wrapper_type(original)
            self.model.set_submodule(path, wrapper)
            self.on_detach(lambda: self.model.set_submodule(path, original))
            self._wrappers[key] = wrapper
        return self._wrappers[key]

    def on_detach(self, undo: Callable[[], None]) -> None:
        """Register a change's undo; detach runs them last first."""
        self._undo.append(undo)

    # -- public --------------------------------------------------------------------------------------------------------

    def detach(self) -> None:
        """Put the model back exactly as it was (same module objects, same parameter objects, same config)."""
        if not self.attached:
            return
        while self._undo:
            self._undo.pop()()
        self.attached = False

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The adapters' parameters (``requires_grad`` when attached with ``trainable=True``)."""
        return iter(self.tensors.values())

    def parameter_names(self) -> dict[str, str]:
        """``"<adapter index>/<tensor name>"`` -> the parameter's qualified name in ``model.named_parameters()``."""
        qualified = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        return {key: qualified[id(p)] for key, p in self.tensors.items() if id(p) in qualified}

    def to_adapters(self) -> list[Adapter]:
        """The adapters with their current tensor values (after training): detached copies on the CPU, in each
        adapter's own dtypes, with the manifests as given."""
        out = []
        for index, adapter in enumerate(self.adapters):
            tensors = {name: self.tensors[f"{index}/{name}"].detach().to("cpu", tensor.dtype, copy=True)
                       for name, tensor in adapter.tensors.items()}
            out.append(Adapter(copy.deepcopy(adapter.manifest), tensors))
        return out

    def __enter__(self) -> "AttachedAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: torch.nn.Module, adapters: Adapter | Sequence[Adapter], weights: Sequence[float] | None = None, *,
           force: bool = False, trainable: bool = False) -> AttachedAdapters:
    """Attach ``adapters`` to ``model`` in place; each adapter's effect is multiplied by its weight (and by each
    component's own weight). Refuses an adapter made for another base (fingerprint) unless ``force``. The model's
    own parameters are left as they are (freeze them yourself to train only the adapters)."""
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    weights = _weights(adapters, weights)
    handle = AttachedAdapters(model, adapters, trainable)
    for index, adapter in enumerate(adapters):
        replaced = [handle.resolve(c.name, t) for c in adapter.components if c.kind == "full" for t in c.targets]
        check_base(adapter, model, f"adapter {index} ({adapter.manifest.base_model.id or 'no base id'})", force,
                   replaced=replaced, also_exclude=_attached_parameter_names(model))
    try:
        for index, (adapter, weight) in enumerate(zip(adapters, weights)):
            for component in adapter.components:
                tensors = adapter.component_tensors(component.name)
                _attacher(component.kind)(handle, index, component, tensors, weight * component.weight)
    except BaseException:
        handle.detach()
        raise
    return handle


def _attacher(kind: str):
    """The ``attach(handle, index, component, tensors, weight)`` function of a kind's module in this package."""
    if kind not in ATTACHABLE:
        raise AdapterError(f"adapters of kind {kind!r} cannot be attached (attachable: {', '.join(ATTACHABLE)})")
    return importlib.import_module(f"adapterkit.attach.{kind}").attach


def _attached_parameter_names(model: torch.nn.Module) -> list[str]:
    """Parameters that adapters attached earlier added to ``model`` (not part of the base)."""
    from adapterkit.attach.prefix import PrefixKV

    names = []
    for path, module in model.named_modules():
        if isinstance(module, AdapterWrapper):
            names += [f"{path}.{name}" for name, _ in module.adapter_parameters()]
        elif isinstance(module, PrefixKV):
            names.append(path)
    return names
