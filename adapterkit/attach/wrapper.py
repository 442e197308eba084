"""The module attach (and the ONNX export) swaps in around a base module: the original kept whole as ``base``, and the
entries of every kind that acts on it, run in attach order.

    x → before₁ → before₂ → … → base → after₁ → after₂ → … → y

(each on the rows of the batch its entry acts on: all of them, or in a per-row attach its adapter's rows)

Each entry is a kind's runtime (its forward function), where its tensors come from (trainable parameters for
attach, graph inputs for the export) and the scale it applies. Entries run in the registry's order of their kinds
(:data:`adapterkit.kinds.REGISTERED`), and in attach order within a kind, so attach, merge and the ONNX graph agree
whatever order adapters come in. Detach puts ``base`` back where the wrapper stood, so the model gets its own objects
back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from adapterkit.attach.rows import EACH_ROW, RowSelection

#: marks the parameters adapterkit adds to a model (they are not part of the base: the fingerprint leaves them out)
ADAPTER_PARAMETER = "_adapterkit_adapter_parameter"


class AdapterTensors(torch.nn.Module):
    """Where an attached entry's tensors come from: its own parameters, one per role (``<module>.adapters.<key>.<role>``
    in the model's state dict). In a per-row attach, ``selection`` says which rows of a batch use ``adapter`` (the
    place of the entry's adapter in the attach)."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], selection: RowSelection | None = None,
                 adapter: int = 0):
        super().__init__()
        self.roles = list(parameters)
        self.selection, self.adapter = selection, adapter
        for role, parameter in parameters.items():
            setattr(parameter, ADAPTER_PARAMETER, True)
            self.register_parameter(role, parameter)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {role: getattr(self, role) for role in self.roles}


class Derived:
    """A source read through another: ``change`` applied to its tensors, the same rows."""

    def __init__(self, source, change):
        self.source, self.change = source, change
        self.selection, self.adapter = getattr(source, "selection", None), getattr(source, "adapter", 0)
        self.each_row = getattr(source, "each_row", False)

    def tensors(self) -> dict:
        return self.change(self.source.tensors())


def rows_of(source) -> torch.Tensor | str | None:
    """The rows of the batch a source's entry acts on: all (None), or, in a per-row attach, its adapter's, or
    :data:`~adapterkit.attach.rows.EACH_ROW` for a source whose tensors have one entry per row (``each_row``)."""
    if getattr(source, "each_row", False):
        return EACH_ROW
    selection = getattr(source, "selection", None)
    return None if selection is None else selection.rows(source.adapter)


def share_rows(source, other) -> bool:
    """Whether two sources' entries can act on one row: always, unless both belong to a per-row attach and to
    different adapters of it."""
    selection = getattr(source, "selection", None)
    return selection is None or selection is not getattr(other, "selection", None) or source.adapter == other.adapter


@dataclass
class Entry:
    runtime: object  #: the kind's :class:`~adapterkit.kinds.runtime.Runtime`
    source: object  #: has ``tensors() -> {role: tensor}`` (and, in a per-row attach, ``selection`` and ``adapter``)
    scale: float


class AdapterWrapper(torch.nn.Module):
    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base
        self.adapters = torch.nn.ModuleDict()  # the sources that are modules (parameters), by entry key
        self.entries: list[Entry] = []
        #: what a kind keeps between forwards on this module (LoRA: its adapters' factors stacked, for mixed batches)
        self.memo: dict = {}

    def add(self, key: str, runtime, source, scale: float) -> None:
        from adapterkit.kinds import order

        if isinstance(source, torch.nn.Module):
            self.adapters[key] = source
        self.entries.append(Entry(runtime, source, scale))
        self.entries.sort(key=lambda entry: order(entry.runtime.kind))  # stable: attach order within a kind

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tensors = [entry.source.tensors() for entry in self.entries]
        rows = [rows_of(entry.source) for entry in self.entries]
        for entry, held, selected in zip(self.entries, tensors, rows):
            x = entry.runtime.before_rows(self.base, x, held, entry.scale, selected)
        y = self.base(x, *args, **kwargs)
        for runtime, group in itertools.groupby(zip(self.entries, tensors, rows), key=lambda t: t[0].runtime):
            y = runtime.after_each(self.base, x, y, [(held, entry.scale, selected) for entry, held, selected in group],
                                   self.memo)
        return y

    def __getattr__(self, name: str):
        # Code around the module still reads its attributes (``weight``, ``in_features``, ...): find them on base.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def adapter_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The parameters this wrapper added (not those of ``base``), with their names relative to the wrapper."""
        return self.adapters.named_parameters(prefix="adapters")


def innermost(module: torch.nn.Module) -> torch.nn.Module:
    """The original module under any wrappers (attaching twice wraps a wrapper)."""
    while isinstance(module, AdapterWrapper):
        module = module.base
    return module
