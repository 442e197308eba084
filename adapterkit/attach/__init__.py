"""Attach adapters to a torch model in memory (unmerged, swappable, trainable) and detach them again.

    from adapterkit.attach import attach
    with attach(model, [support, legal], weights=[0.7, 0.3]) as handle:
        logits = model(input_ids).logits          # base + 0.7·support + 0.3·legal
    # the model is bit for bit the base again

    with attach(model, [support, legal], per_row=True) as handle:   # a mixed batch: each row its own adapter
        with handle.rows([0, 1, None]):           # row 0 support, row 1 legal, row 2 the base
            logits = model(input_ids).logits      # each row as it is alone with its adapter attached

Nothing is folded into the base weights: each component's kind installs its forward function where it acts (around
a module, inside attention, in place of a parameter; see :mod:`adapterkit.kinds.runtime`), reading the adapter's
tensors as parameters of their own. This module checks the base, resolves target names, and keeps the list of changes
that :meth:`AttachedAdapters.detach` undoes in reverse order. The ONNX export installs its graph inputs through the
same handle (:meth:`AttachedAdapters.install`), so attach and export run one mechanism.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from adapterkit.adapter import Adapter
from adapterkit.arrays import to_torch
from adapterkit.attach.rows import RowSelection
from adapterkit.attach.wrapper import ADAPTER_PARAMETER, AdapterTensors, AdapterWrapper
from adapterkit.errors import RequestError
from adapterkit.fingerprints import check_base
from adapterkit.kinds import get_kind
from adapterkit.manifest import Component
from adapterkit.targets import resolve_module
from adapterkit.values import check_weights

log = logging.getLogger(__name__)

__all__ = ["AttachedAdapters", "attach"]


class AttachedAdapters:
    """What :func:`attach` returns: the adapters' live tensors, and the way back to the base model.

    ``tensors`` maps ``"<adapter index>/<tensor name>"`` to the ``nn.Parameter`` used in the forward pass (train it,
    or read it back with :meth:`to_adapters`). Use it as a context manager to detach on exit.
    """

    def __init__(self, model: torch.nn.Module, adapters: Sequence[Adapter] = (), trainable: bool = False,
                 per_row: bool = False):
        self.model = model
        self.adapters = list(adapters)
        self.trainable = trainable
        #: per-row attach: which adapter each row of a batch uses (None: every adapter acts on every row)
        self.selection = RowSelection(len(self.adapters)) if per_row else None
        self.tensors: dict[str, torch.nn.Parameter] = {}
        self._modules = {name for name, _ in model.named_modules()}
        self._undo: list[Callable[[], None]] = []
        self._wrappers: dict[str, AdapterWrapper] = {}
        #: what a kind's runtime keeps for the length of this attach (the prefix runtime: its stores)
        self.shared: dict[str, object] = {}
        self.attached = True

    # -- used by the kinds' runtimes and the ONNX export ---------------------------------------------------------------

    def resolve(self, component_name: str, target: str) -> str:
        """The model's module path for an adapter target (exact, else differing by the model's wrapper prefix)."""
        module = resolve_module(target, self._modules)
        if module is None:
            raise RequestError(f"component {component_name!r}: target {target!r} is not a module of this model")
        return module

    def wrapper(self, path: str) -> AdapterWrapper:
        """The wrapper this attach put around module ``path``, created and swapped in on first use (every entry on one
        module shares it, in attach order)."""
        if path not in self._wrappers:
            original = self.model.get_submodule(path)
            wrapper = AdapterWrapper(original)
            wrapper.train(original.training)
            self.model.set_submodule(path, wrapper)
            self.on_detach(lambda: self.model.set_submodule(path, original))
            self._wrappers[path] = wrapper
        return self._wrappers[path]

    def on_detach(self, undo: Callable[[], None]) -> None:
        """Register a change's undo; detach runs them last first."""
        self._undo.append(undo)

    def install(self, runtime, path: str, key: str, source, scale: float, component=None, target=None) -> None:
        """Put one entry of a kind on module ``path``: its forward reads its tensors from ``source``."""
        runtime.install(self, path, key, source, scale, component, target)

    # -- public --------------------------------------------------------------------------------------------------------

    def detach(self) -> None:
        """Put the model back exactly as it was (same module objects, same parameter objects, same config)."""
        if not self.attached:
            return
        while self._undo:
            self._undo.pop()()
        self.attached = False

    @contextlib.contextmanager
    def rows(self, index: Sequence[int | None] | torch.Tensor) -> Iterator[None]:
        """Per-row attach: inside, row i of a batch uses adapter ``index[i]`` (its place in the attach), None or -1
        the base."""
        if self.selection is None:
            raise RequestError("these adapters act on every row: attach them with per_row=True to give rows their own")
        device = next((p.device for p in self.model.parameters()), None)
        self.selection.set(index, device)
        try:
            yield
        finally:
            self.selection.set(None)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The adapters' parameters (``requires_grad`` when attached with ``trainable=True``)."""
        return iter(self.tensors.values())

    def parameter_names(self) -> dict[str, str]:
        """``"<adapter index>/<tensor name>"`` -> the parameter's qualified name in ``model.named_parameters()``."""
        qualified = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        return {key: qualified[id(p)] for key, p in self.tensors.items() if id(p) in qualified}

    def to_adapters(self) -> list[Adapter]:
        """The adapters with their current tensor values (after training): copies, in each adapter's own dtypes,
        with the manifests as given."""
        out = []
        for index, adapter in enumerate(self.adapters):
            tensors = {name: self.tensors[f"{index}/{name}"].detach().to("cpu", to_torch(array).dtype, copy=True)
                       for name, array in adapter.tensors.items()}
            out.append(Adapter(copy.deepcopy(adapter.manifest), tensors))
        return out

    def __enter__(self) -> "AttachedAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: torch.nn.Module, adapters: Adapter | Sequence[Adapter], weights: Sequence[float] | None = None, *,
           force: bool = False, trainable: bool = False, per_row: bool = False, dtype: torch.dtype | None = None,
           reference: str | os.PathLike | None = None) -> AttachedAdapters:
    """Attach ``adapters`` to ``model`` in place; each adapter's effect is multiplied by its weight (and by each
    component's own weight). Refuses an adapter made for another base (fingerprint) unless ``force``. The model's
    own parameters are left as they are (freeze them yourself to train only the adapters).

    ``per_row``: the adapters are not added up; each row of a batch uses the one :meth:`AttachedAdapters.rows` names
    (or none).
    ``dtype``: the dtype of the adapter's tensors (default: the float dtype of each target module). Training over a
    base held in a lower precision keeps them float32 (:mod:`adapterkit.precision`).
    ``reference``: what the fingerprint check compares against: ``model`` itself (default), or the checkpoint
    folder the model was loaded from, for a model held quantized, whose weights no longer give the folder's
    fingerprint."""
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    weights = check_weights(weights, len(adapters))
    handle = AttachedAdapters(model, adapters, trainable, per_row)
    for index, adapter in enumerate(adapters):
        replaced = [handle.resolve(c.name, t) for c in adapter.components for t in get_kind(c.kind).replaced_targets(c)]
        check_base(adapter, model if reference is None else reference,
                   f"adapter {index} ({adapter.manifest.base_model.id or 'no base id'})", force, replaced=replaced)
    try:
        for index, (adapter, weight) in enumerate(zip(adapters, weights)):
            for component in adapter.components:
                _attach_component(handle, index, component, adapter.component_tensors(component.name),
                                  weight * component.weight, dtype)
    except BaseException:
        handle.detach()
        raise
    return handle


def _attach_component(handle: AttachedAdapters, index: int, component: Component,
                      tensors: Mapping[str, Mapping[str, np.ndarray]], weight: float,
                      dtype: torch.dtype | None = None) -> None:
    kind = get_kind(component.kind)
    if not kind.weighted and weight != 1:
        raise RequestError(f"component {component.name!r} is a {kind.name} with weight {weight:g}: "
                           f"it cannot be weighted ({kind.unweighted_reason}); attach it with weight 1")
    runtime = kind.runtime
    for target in component.targets:
        path = handle.resolve(component.name, target)
        module = handle.model.get_submodule(path)
        roles = tensors[target]
        runtime.check_fits(module, path, component, target, roles)
        scale = runtime.scale(component, target, roles, weight)
        folded = runtime.fold(component, target, roles, weight)
        bad = next((role for role, tensor in folded.items() if not bool(torch.isfinite(tensor).all())), None)
        if bad is not None:
            raise RequestError(f"component {component.name!r}, target {target!r}: {bad} times its scale {scale:g} "
                               "is not finite in float32; the weight or alpha is too large")
        like = _like(module)
        parameters = {role: _parameter(array, like, handle.trainable, dtype) for role, array in roles.items()}
        for role, parameter in parameters.items():
            handle.tensors[f"{index}/{component.name}.{target}.{role}"] = parameter
        source = AdapterTensors(parameters, handle.selection, index)
        handle.install(runtime, path, f"{index}_{component.name}", source, scale, component, target)


def _like(module: torch.nn.Module) -> torch.Tensor | None:
    """A tensor of the module whose device and float dtype the adapter's tensors take."""
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def _parameter(array: np.ndarray, like: torch.Tensor | None, trainable: bool,
               dtype: torch.dtype | None = None) -> torch.nn.Parameter:
    """A fresh ``nn.Parameter`` holding a copy of an adapter tensor, on the device of ``like``, in ``dtype`` (default:
    ``like``'s). The adapter's own tensor is never changed."""
    tensor = to_torch(array)
    if like is not None:
        tensor = tensor.to(device=like.device, dtype=dtype or like.dtype)
    elif dtype is not None:
        tensor = tensor.to(dtype)
    parameter = torch.nn.Parameter(tensor.detach().clone(), requires_grad=trainable)
    setattr(parameter, ADAPTER_PARAMETER, True)
    return parameter


def is_adapter_parameter(parameter: torch.Tensor) -> bool:
    return bool(getattr(parameter, ADAPTER_PARAMETER, False))

