"""Mixed batches: which attached adapter each row of a batch uses.

A per-row attach (``attach(model, adapters, per_row=True)``) does not add its adapters up: each row of a batch uses
one of them, or none. The forward that reads them is told which, row by row, through one :class:`RowSelection`
shared by every entry of the attach; each kind's per-row form (:meth:`~adapterkit.kinds.runtime.Runtime.after_rows`
and the like) then acts on its adapter's rows only, so a row's result is the one it gets alone with its adapter
attached.
"""

from __future__ import annotations

from typing import Sequence

import torch

from adapterkit.errors import RequestError

#: a row that uses no adapter (the base model)
NO_ADAPTER = -1
#: the rows an entry acts on when its tensors have a leading row dimension (an ONNX adapter bank gathered by each
#: row's adapter index): row i with tensors[i]
EACH_ROW = "each row"


class RowSelection:
    """The adapter of every row of the batch being run (set by :meth:`AttachedAdapters.rows`), and, per adapter, the
    indices of its rows (computed once per batch: every module reads them)."""

    def __init__(self, count: int):
        self.count = count
        self.index: torch.Tensor | None = None
        self._rows: dict[int, torch.Tensor] = {}

    def set(self, index: Sequence[int | None] | torch.Tensor | None, device: torch.device | None = None) -> None:
        """``index[i]``: the adapter (its place in the attach) of row i; None or -1 for the base."""
        if index is None:
            self.index, self._rows = None, {}
            return
        if not isinstance(index, torch.Tensor):
            index = torch.tensor([NO_ADAPTER if i is None else int(i) for i in index], dtype=torch.long)
        index = index.to(device=device, dtype=torch.long).flatten()
        if index.numel() and not bool(((index >= NO_ADAPTER) & (index < self.count)).all()):
            raise RequestError(f"a row's adapter must be one of 0..{self.count - 1} or -1 (none), got "
                               f"{index.tolist()}")
        self.index = index
        self._rows = {adapter: (index == adapter).nonzero().flatten() for adapter in range(self.count)}

    def rows(self, adapter: int) -> torch.Tensor:
        """The indices of the rows that use ``adapter`` (possibly none)."""
        if self.index is None:
            raise RequestError("a per-row attach needs each row's adapter: run the model inside handle.rows(...)")
        return self._rows[adapter]


def on_rows(tensor: torch.Tensor, rows: torch.Tensor | None, change) -> torch.Tensor:
    """``tensor`` with the rows ``rows`` (all when None) replaced by ``change(rows)``, their new values; the other
    rows as they were. The rows are gathered, so the change runs on exactly those rows (grouped rows, as a batch of
    their own)."""
    if rows is None or rows.numel() == tensor.shape[0]:
        return change(None)
    if rows.numel() == 0:
        return tensor
    return tensor.index_copy(0, rows, change(rows))


def take(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows ``rows`` of ``tensor`` (all of it when None)."""
    return tensor if rows is None else tensor.index_select(0, rows)


def each_row(function, x: torch.Tensor, *outputs: torch.Tensor, tensors: dict) -> torch.Tensor:
    """``function(x_i, *outputs_i, tensors_i)`` for every row i of the batch, each row with its own tensors (their
    leading dimension is the row's), vectorised by ``torch.func.vmap``: ``function`` sees a batch of one row and the
    tensors of that row, as it would with one adapter attached."""
    def one(x_row, *rest):
        *row_outputs, row_tensors = rest
        return function(x_row[None], *(t[None] for t in row_outputs), row_tensors)[0]

    return torch.func.vmap(one)(x, *outputs, tensors)
