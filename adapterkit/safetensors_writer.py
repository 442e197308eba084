"""Write a safetensors file one tensor at a time.

A safetensors file is an 8-byte header length, a JSON header (every tensor's dtype, shape and byte range) and the
tensor bytes. When the names, dtypes and shapes are known before the data (as when rewriting a checkpoint), the header
can be written first and each tensor appended as soon as it is computed, so no more than one tensor is ever held in
memory (``safetensors.torch.save_file`` needs them all at once).
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct

import torch

from adapterkit.fileformat import DTYPES

SAFETENSORS_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


class StreamedSafetensorsWriter:
    """``entries`` are ``(name, dtype, shape)`` in the order the tensors will be written."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, list[int]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        self._expected = collections.deque(entries)
        offset = 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._expected.popleft()
        if (name, tensor.dtype, list(tensor.shape)) != (expected_name, dtype, list(shape)):
            raise ValueError(f"expected {expected_name} {dtype} {shape}, got {name} {tensor.dtype} {list(tensor.shape)}")
        if tensor.numel():
            self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # little-endian, as torch stores

    def close(self) -> None:
        if self._expected:
            raise ValueError(f"{len(self._expected)} tensors were never written, the first {self._expected[0][0]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> "StreamedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
