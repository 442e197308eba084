"""The adapter bank: many adapters in one graph run, each row of a batch with its own (or none).

A graph exported with ``bank=True`` takes, instead of one adapter's slot tensors, every slot stacked over the adapters
of a bank, plus ``adapter_index`` [batch]: row i uses the bank's entry ``adapter_index[i]``. In the graph each slot
entry gathers its rows' tensors (``bank[adapter_index]``) and the kind's forward runs on each row with that row's
tensors (:func:`adapterkit.attach.rows.each_row`), so a row gets what it gets alone with its adapter.

    <slot>                 [n, ...slot shape]   the slot of every entry, the dynamic axis (a rank, a prefix length,
                                                a bottleneck size) zero-padded to the longest of the bank
    <module>.prefix.length [n] int64            each entry's prefix length on that module (the padding is masked)
    adapter_index          [batch] int64        the entry of each row

Entry 0 is the base: every slot at its empty value (r = 0, p = 0, Δb = 0, ones for (IA)³, the base tensor for
``full``). An adapter that has no tensors for a slot gets the empty value there. Padding with zeros is exact: a zero
row of LoRA's A and column of B add nothing, a zero bottleneck unit has a zero up-projection, and a padded prefix
position is masked out of attention.

:class:`Bank` holds the stacked arrays (numpy, for the runner): adapters are added and removed at run time, and only
the arrays change, never the session.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from adapterkit.errors import AdapterError, RequestError

INDEX_INPUT = "adapter_index"


class Bank:
    """The stacked slot arrays of a bank graph. ``empty``: each slot's value with no adapter (the dynamic axis at
    length 0); ``axes``: each slot's dynamic axis (unstacked), if it has one; ``lengths``: each length input and the
    slot whose dynamic length it gives."""

    def __init__(self, empty: Mapping[str, np.ndarray], axes: Mapping[str, int], lengths: Mapping[str, str]):
        self.empty, self.axes, self.lengths = dict(empty), dict(axes), dict(lengths)
        self.entries: dict[str, dict[str, np.ndarray]] = {}
        self._stacked: dict[str, np.ndarray] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def add(self, name: str, feeds: Mapping[str, np.ndarray], source: object = None) -> None:
        """Add (or replace) adapter ``name`` with its slot tensors; refused if one has no slot in the graph or does
        not fit it (``source`` names the file in the message)."""
        for slot, array in feeds.items():
            if slot not in self.empty:
                raise AdapterError(f"adapter {name!r} feeds {slot!r}, which this graph has no input for (export the "
                                   "graph with an adapter of that kind on that module)", source)
            expected = list(self.empty[slot].shape)
            shape = list(array.shape)
            if slot in self.axes and len(shape) == len(expected):
                shape[self.axes[slot]] = expected[self.axes[slot]] = 0
            if shape != expected:
                raise AdapterError(f"adapter {name!r}: {slot} is {list(array.shape)}, the graph takes "
                                   f"{list(self.empty[slot].shape)} there", source)
            if not np.isfinite(array).all():
                raise AdapterError(f"adapter {name!r}: {slot} holds NaN or infinite values", source)
        self.entries[name] = {slot: np.asarray(array, np.float32) for slot, array in feeds.items()}
        self._stacked = None

    def remove(self, name: str) -> None:
        if name not in self.entries:
            raise RequestError(f"no adapter {name!r} in the bank (adapters: {', '.join(self.entries) or 'none'})")
        del self.entries[name]
        self._stacked = None

    def index(self, rows: Sequence[str | None]) -> np.ndarray:
        """``adapter_index`` for rows that use the named adapters (None: the base)."""
        places = {name: i + 1 for i, name in enumerate(self.entries)}
        unknown = sorted({row for row in rows if row is not None and row not in places})
        if unknown:
            raise RequestError(f"no adapter {', '.join(map(repr, unknown))} in the bank (adapters: "
                               f"{', '.join(self.entries) or 'none'})")
        return np.array([0 if row is None else places[row] for row in rows], np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every bank input, entry 0 the base and then the adapters in the order they were added (kept until the
        bank changes)."""
        if self._stacked is None:
            entries = [{}, *self.entries.values()]
            self._stacked = {slot: self._stack(slot, [e.get(slot, empty) for e in entries])
                             for slot, empty in self.empty.items()}
            for length, slot in self.lengths.items():
                self._stacked[length] = np.array([e[slot].shape[self.axes[slot]] if slot in e else 0
                                                  for e in entries], np.int64)
        return self._stacked

    def _stack(self, slot: str, arrays: list[np.ndarray]) -> np.ndarray:
        axis = self.axes.get(slot)
        if axis is None:
            return np.stack(arrays)
        longest = max(a.shape[axis] for a in arrays)
        padded = []
        for array in arrays:
            widths = [(0, 0)] * array.ndim
            widths[axis] = (0, longest - array.shape[axis])
            padded.append(np.pad(array, widths))
        return np.stack(padded)


def length_slots(slots: Sequence[str]) -> dict[str, str]:
    """``{length input: slot}`` for each slot whose kind needs its padding masked
    (:attr:`~adapterkit.kinds.runtime.Runtime.length_of`: a prefix's keys)."""
    from adapterkit.kinds import get_kind
    from adapterkit.kinds.runtime import BANK_LENGTH
    from adapterkit.onnx.slots import slot_name, split_slot

    found = {}
    for slot in slots:
        module, kind, role = split_slot(slot)
        if get_kind(kind).runtime.length_of == role:
            found[slot_name(module, kind, BANK_LENGTH)] = slot
    return found
