"""The torch half of a kind: :class:`Runtime`, the contract of each kind package's ``runtime.py``.

One forward function per kind serves attach and the ONNX export alike. What differs is where its tensors come from:

- attach gives it the adapter's tensors as trainable ``nn.Parameter`` s and the scale (for LoRA s·w) to apply;
- the export gives it graph inputs that already hold the scale (:meth:`Runtime.fold`), and a scale of 1.

Both install the kind the same way (:meth:`Runtime.install`): by default into an
:class:`~adapterkit.attach.wrapper.AdapterWrapper` around the target module, which runs every entry's :meth:`before`
on the module's input, the module, then every entry's :meth:`after` on its output, in the order they were attached.
Kinds that act elsewhere (inside attention, in place of a parameter) override :meth:`install`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from adapterkit.arrays import to_torch
from adapterkit.attach.rows import EACH_ROW, each_row, on_rows, take
from adapterkit.errors import RequestError
from adapterkit.manifest import Component

#: {role: tensor} of one target
Roles = Mapping[str, torch.Tensor]


def in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` where it is a floating-point tensor of another dtype (token ids stay as they are). An adapter
    trained in float32 over a base held in bfloat16 computes in its own dtype and gives the module's output back in
    the base's; where the dtypes agree (float32 attach, the ONNX export) nothing is converted."""
    if x.is_floating_point() and x.dtype != dtype:
        return x.to(dtype)
    return x


#: the bank input role that holds each entry's length of :attr:`Runtime.length_of`
BANK_LENGTH = "length"


class Runtime:
    """The torch side of a kind. Subclasses override what their kind does."""

    #: the kind's name (set by the registry when it loads the runtime)
    kind: str = ""

    #: ONNX: role -> the axis whose length differs between adapters (a rank, a prefix length); other roles have a
    #: fixed shape. An absent adapter is the slot at length 0 there, or :meth:`empty` for fixed shapes.
    dynamic_axes: Mapping[str, int] = {}
    #: ONNX: the base module's parameters the value of an absent adapter (:meth:`empty`) is computed from: it stays
    #: "no adapter" only while the module keeps them (DoRA's magnitude is the base weight's norm)
    empty_reads: tuple[str, ...] = ()
    #: ONNX adapter bank: the role whose dynamic length each entry must give (``<module>.<kind>.length``), because
    #: its zero padding is attended to and has to be masked (a prefix's keys); None where zero padding is exact
    length_of: str | None = None

    # -- forward: one function for attach (parameters, scale) and export (folded graph inputs, scale 1) ---------------

    def before(self, base: torch.nn.Module, x: torch.Tensor, tensors: Roles, scale: float) -> torch.Tensor:
        """The module's input as this entry changes it (default: unchanged)."""
        return x

    def after(self, base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tensors: Roles,
              scale: float) -> torch.Tensor:
        """The module's output as this entry changes it; ``x`` is the input the module saw."""
        return y

    # -- the per-row form (mixed batches): the forward on some rows of the batch, the others left as they are ----------

    def before_rows(self, base: torch.nn.Module, x: torch.Tensor, tensors: Roles, scale: float,
                    rows: torch.Tensor | None) -> torch.Tensor:
        """:meth:`before` on the rows ``rows`` of the batch (all when None). Default: those rows gathered, changed
        as a batch of their own, and put back; with ``rows`` :data:`~adapterkit.attach.rows.EACH_ROW`, each row with
        its own tensors."""
        if rows is EACH_ROW:
            return each_row(lambda x1, t1: self.before(base, x1, t1, scale), x, tensors=tensors)
        return on_rows(x, rows, lambda r: self.before(base, take(x, r), tensors, scale))

    def after_rows(self, base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tensors: Roles, scale: float,
                   rows: torch.Tensor | None) -> torch.Tensor:
        """:meth:`after` on the rows ``rows`` of the batch (all when None), as :meth:`before_rows`."""
        if rows is EACH_ROW:
            return each_row(lambda x1, y1, t1: self.after(base, x1, y1, t1, scale), x, y, tensors=tensors)
        return on_rows(y, rows, lambda r: self.after(base, take(x, r), take(y, r), tensors, scale))

    def after_each(self, base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   parts: Sequence[tuple[Roles, float, torch.Tensor | None]], memo: dict) -> torch.Tensor:
        """Several entries of this runtime on one module, in order, each ``(tensors, scale, rows)`` on its rows.
        ``memo`` is the module's to keep what may be reused between calls. Default: :meth:`after_rows` of each."""
        for tensors, scale, rows in parts:
            y = self.after_rows(base, x, y, tensors, scale, rows)
        return y

    def scale(self, component: Component, target: str, roles: Mapping[str, np.ndarray], weight: float) -> float:
        """The factor attach applies to a target's tensors in :meth:`after`: the component's weight (times the kind's
        own scale, such as LoRA's α/r). ``weight`` is the adapter's weight times the component's."""
        return weight

    def fold(self, component: Component, target: str, roles: Mapping[str, np.ndarray],
             weight: float) -> dict[str, torch.Tensor]:
        """A target's tensors with :meth:`scale` folded in, float32: what the ONNX graph is fed (so it runs with scale
        1). Default: every tensor times the scale."""
        scale = self.scale(component, target, roles, weight)
        return {role: to_torch(array).float() * scale for role, array in roles.items()}

    def combine(self, role: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Several adapters' folded tensors of one role on one module, as one graph input: along the dynamic axis
        (exact for the kinds that declare one), else summed."""
        if len(tensors) == 1:
            return tensors[0]
        if role in self.dynamic_axes:
            return torch.cat(list(tensors), dim=self.dynamic_axes[role])
        return torch.stack(list(tensors)).sum(0)

    def empty(self, role: str, example: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """The graph input's value when no adapter fills it, so that the graph is the base model there."""
        if role in self.dynamic_axes:
            shape = list(example.shape)
            shape[self.dynamic_axes[role]] = 0
            return torch.zeros(shape)
        return torch.zeros(example.shape)

    # -- installing -------------------------------------------------------------------------------------------------

    def check_fits(self, module: torch.nn.Module, path: str, component: Component, target: str,
                   roles: Mapping[str, np.ndarray]) -> None:
        """Raise an AdapterError if a target's tensors do not fit the base module they act on."""

    def install(self, handle, path: str, key: str, source, scale: float, component: Component | None = None,
                target: str | None = None) -> None:
        """Put one entry (its tensors from ``source``) on the module at ``path`` of ``handle.model``. ``component``
        and ``target`` are the attached adapter's (None for the ONNX export's slots, whose inputs say all)."""
        handle.wrapper(path).add(key, self, source, scale)

    # -- merge --------------------------------------------------------------------------------------------------------

    #: the parameters of a target module that merging changes (``("weight",)``, ``("bias",)``)
    merged_parameters: tuple[str, ...] = ()
    #: those of :attr:`merged_parameters` that merging changes only where the base has them (a bias that is scaled:
    #: a module without one has nothing to scale); a missing one of the others is refused
    optional_parameters: tuple[str, ...] = ()

    def merge(self, component: Component, target: str, roles: Mapping[str, np.ndarray], parameter: str,
              tensor: torch.Tensor, weight: float) -> dict[str, torch.Tensor] | None:
        """Fold one target into ``tensor`` (the base's ``parameter``, float32, stored layout) in place. Returns what
        :meth:`unmerge` needs and the merged weights no longer hold (None when nothing is needed)."""
        raise RequestError(f"component {component.name!r} cannot be merged")

    def unmerge(self, component: Component, target: str, roles: Mapping[str, np.ndarray], parameter: str,
                tensor: torch.Tensor, weight: float, record: Mapping[str, torch.Tensor] | None) -> None:
        """Undo :meth:`merge` on ``tensor`` in place, given what it returned."""
        raise RequestError(f"component {component.name!r} cannot be unmerged")

    # -- training -----------------------------------------------------------------------------------------------------

    def candidates(self, model: torch.nn.Module, head: Sequence[str]) -> list[str]:
        """Every module of ``model`` (outside the new ``head`` modules) this kind can act on: what ``--targets``
        suffixes are matched against."""
        return []

    def default_targets(self, model: torch.nn.Module, head: Sequence[str]) -> list[str]:
        """The modules ``train`` adapts when the user names none."""
        return self.candidates(model, head)

    def initial(self, model: torch.nn.Module, targets: Sequence[str], options: Mapping,
                generator: torch.Generator) -> tuple[dict, dict, dict[str, dict[str, torch.Tensor]]]:
        """A new, untrained component on ``targets``: ``(params, target_params, {target: {role: tensor}})``."""
        raise RequestError("this kind cannot be trained")
