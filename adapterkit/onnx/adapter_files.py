"""``.onnx_adapter`` files: the tensors one adapter feeds into an exported graph, in ONNX Runtime's adapter format.

ONNX Runtime (≥ 1.20) loads them with ``ort.LoraAdapter().Load(path)`` and activates one per call with
``RunOptions.add_active_adapter``; each tensor is fed to the graph input of the same name.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import torch

from adapterkit.io.outputs import write_file_atomically

#: the format's own versions of what the adapter is and which model it was made for
ADAPTER_VERSION = 1
MODEL_VERSION = 1


def write_onnx_adapter(feeds: dict[str, torch.Tensor], path: str | os.PathLike, inputs=()) -> None:
    """Write ``feeds`` (slot name -> tensor, see :func:`adapterkit.onnx.slots.adapter_feeds`) atomically, never over
    one of ``inputs``."""
    arrays = {name: np.ascontiguousarray(tensor.detach().float().numpy()) for name, tensor in feeds.items()}

    def write(tmp: str) -> None:
        adapter_format = ort.AdapterFormat()
        adapter_format.set_adapter_version(ADAPTER_VERSION)
        adapter_format.set_model_version(MODEL_VERSION)
        adapter_format.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()})
        adapter_format.export_adapter(tmp)

    write_file_atomically(path, write, inputs=inputs)


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``.onnx_adapter`` file, by input name."""
    adapter_format = ort.AdapterFormat.read_adapter(os.fspath(path))
    # copied: the arrays would otherwise point into memory the format object frees
    return {name: value.numpy().copy() for name, value in adapter_format.get_parameters().items()}
