"""ONNX Runtime's ``.onnx_adapter`` format (ort.AdapterFormat): the tensors one adapter feeds into a graph exported
with ``adapterkit export --onnx --unmerged``, named after the graph inputs (see :mod:`adapterkit.onnx.slots`), with
LoRA scales and weights already folded in.

Write-only: the file holds tensors and two version numbers, no manifest (kinds, targets, rank, alpha, base model), so
an adapterkit adapter cannot be rebuilt from it.
"""

from __future__ import annotations

import os

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError

SUFFIX = ".onnx_adapter"


def detect(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) and os.fspath(path).endswith(SUFFIX)


def read(path: str | os.PathLike, base=None) -> Adapter:
    raise AdapterError("an .onnx_adapter file holds only the tensors fed to an ONNX graph (scales folded in), no "
                       "manifest: it cannot be converted back; keep the adapterkit file it was made from", path)


def write(adapter: Adapter, path: str | os.PathLike, base: str | os.PathLike | None = None) -> None:
    """Write ``adapter`` for a graph exported from ``base`` (a model folder, used to resolve target names to the
    model's module paths; without it the targets must already be those paths)."""
    from adapterkit.onnx import require_onnxruntime

    require_onnxruntime()
    from adapterkit.onnx.adapter_files import write_onnx_adapter
    from adapterkit.onnx.slots import adapter_feeds

    modules = None
    if base is not None:
        from adapterkit.onnx.export import load_base

        modules = [name for name, _ in load_base(base).named_modules()]
    write_onnx_adapter(adapter_feeds(adapter, modules=modules), path)
