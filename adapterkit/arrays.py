"""Tensors as the format layer holds them: numpy arrays (bfloat16 through ``ml_dtypes``), and the bridge to torch.

The format layer (reading, checking, composing, converting, inspecting) needs no deep-learning framework, as
safetensors itself needs none: adapter tensors are numpy arrays. Code that runs a model (attach, merge, export, train)
turns them into torch tensors with :func:`to_torch` — without a copy, bfloat16 included — and back with
:func:`as_array`. torch is imported only by those two functions, and only when they meet a torch tensor.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

#: safetensors dtype names -> numpy dtypes. Others are refused by name (spec §3.3).
DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_NAMES = ("F16", "BF16", "F32", "F64")
FLOAT_DTYPES = tuple(DTYPES[name] for name in FLOAT_NAMES)
#: how dtypes are spelled in content digests (kept from when adapters held torch tensors, so digests stay stable)
DIGEST_NAMES = {DTYPES["F16"]: "torch.float16", DTYPES["BF16"]: "torch.bfloat16", DTYPES["F32"]: "torch.float32",
                DTYPES["F64"]: "torch.float64"}


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype (``F32``, ``BF16``, ...)."""
    return NAMES[np.dtype(dtype)]


def is_float(array: np.ndarray) -> bool:
    return array.dtype in FLOAT_DTYPES


def all_finite(array: np.ndarray) -> bool:
    """Whether every element is finite (no NaN or ±Inf)."""
    return bool(np.isfinite(array).all())


def as_array(value) -> np.ndarray:
    """A numpy array for a numpy array or a torch tensor (detached, on the CPU; bfloat16 kept as bfloat16)."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return _torch_to_numpy(value)
    return np.asarray(value)


def to_torch(array: np.ndarray, **to):
    """A torch tensor sharing ``array``'s memory (bfloat16 included); ``to`` is passed to ``Tensor.to`` when given."""
    import torch

    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch warns on read-only memory; adapters are never written through it anyway
        array = array.copy()
    if array.dtype == DTYPES["BF16"]:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to(**to) if to else tensor


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
