"""ONNX Runtime's ``.onnx_adapter`` format (ort.AdapterFormat): the tensors one adapter feeds into a graph exported
with ``adapterkit export --onnx --unmerged``, named after the graph inputs (see :mod:`adapterkit.onnx.slots`), with
the scales and weights already folded in.

Write-only: the file holds tensors and two version numbers, no manifest (kinds, targets, rank, alpha, base model), so
an adapterkit adapter cannot be rebuilt from it.
"""

from __future__ import annotations

import os

from adapterkit.adapter import Adapter
from adapterkit.errors import FormatError

SUFFIX = ".onnx_adapter"


def detect(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) and os.fspath(path).endswith(SUFFIX)


def read(path: str | os.PathLike, base=None) -> Adapter:
    raise FormatError("an .onnx_adapter file holds only the tensors fed to an ONNX graph (scales folded in), no "
                      "manifest: it cannot be converted back; keep the adapterkit file it was made from", path)


def write(adapter: Adapter, path: str | os.PathLike, base: str | os.PathLike | None = None, inputs=(),
          overwrite: bool = False) -> None:
    """Write ``adapter`` for a graph exported from ``base`` (a model folder: its module tree resolves target names
    and checks that the tensors fit; without it the targets must already be the graph's module paths)."""
    from adapterkit.onnx import require_onnxruntime

    require_onnxruntime()
    from adapterkit.onnx.adapter_files import write_onnx_adapter
    from adapterkit.onnx.slots import adapter_feeds
    from adapterkit.targets import skeleton

    model = None if base is None else skeleton(base)
    write_onnx_adapter(adapter_feeds(adapter, model=model), path, inputs=inputs)
