"""Write a safetensors file one tensor at a time.

A safetensors file is an 8-byte header length, a JSON header (every tensor's dtype, shape and byte range) and the
tensor bytes. When the names, dtypes and shapes are known before the data (as when rewriting a checkpoint), the header
can be written first and each tensor appended as soon as it is computed, so no more than one tensor is ever held in
memory (``safetensors.torch.save_file`` needs them all at once). Writes run on a background thread, one at a time,
so the next tensor is computed while the previous one goes to disk; tensors left unchanged are copied from their
source file by the kernel (``copy_file_range``) without passing through this process.

Files are not fsync'ed: like ``save_pretrained`` and ``cp``, the bytes reach the disk when the OS writes them back.
Forcing that per shard made a merge of a checkpoint that fits in the page cache take about 1.5× as long. What
guards the user is the rename of a finished folder into place (:mod:`adapterkit.merge_checkpoint`): a failure of
this process never leaves a half-written output, and a merged checkpoint can always be made again from its inputs.
(Adapter files, small and the product of training, are fsync'ed by :func:`adapterkit.fileformat.save`.)
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from adapterkit.fileformat import DTYPES

SAFETENSORS_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


def data_offsets(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file, as absolute ``(begin, end)`` file offsets."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {name: (8 + length + info["data_offsets"][0], 8 + length + info["data_offsets"][1])
            for name, info in header.items()}


class StreamedSafetensorsWriter:
    """``entries`` are ``(name, dtype, shape)`` in the order the tensors will be written."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, list[int]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        self._expected = collections.deque(entries)
        offset = 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._in_flight: Future | None = None
        self._submit(_write_all, self._fd, struct.pack("<Q", len(raw)) + raw)

    def _next(self, name: str, nbytes: int) -> None:
        expected_name, dtype, shape = self._expected.popleft()
        expected_bytes = math.prod(shape) * dtype.itemsize
        if (name, nbytes) != (expected_name, expected_bytes):
            raise ValueError(f"expected {expected_name} ({expected_bytes} bytes), got {name} ({nbytes} bytes)")

    def _submit(self, function, *args) -> None:
        """Run ``function`` on the I/O thread once the previous write is done (raising its error, if any)."""
        self._wait()
        self._in_flight = self._io.submit(function, *args)

    def _wait(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()
            self._in_flight = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (its dtype and shape as announced)."""
        expected_dtype, expected_shape = self._expected[0][1], list(self._expected[0][2])
        if (tensor.dtype, list(tensor.shape)) != (expected_dtype, expected_shape):
            raise ValueError(f"{name}: expected {expected_dtype} {expected_shape}, "
                             f"got {tensor.dtype} {list(tensor.shape)}")
        self._next(name, tensor.numel() * tensor.element_size())
        if tensor.numel():
            # little-endian bytes, as torch stores them on every platform it supports
            self._submit(_write_all, self._fd, tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    def copy(self, name: str, source: str | os.PathLike, begin: int, end: int) -> None:
        """Write the next tensor by copying bytes ``[begin, end)`` of file ``source`` (a tensor left unchanged)."""
        self._next(name, end - begin)
        self._submit(_copy_range, os.fspath(source), self._fd, begin, end)

    def close(self) -> None:
        try:
            self._wait()
            if self._expected:
                raise ValueError(f"{len(self._expected)} tensors were never written, the first {self._expected[0][0]}")
        finally:
            self._io.shutdown()
            os.close(self._fd)

    def __enter__(self) -> "StreamedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        self._io.shutdown(cancel_futures=True)
        os.close(self._fd)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _copy_range(source: str, fd: int, begin: int, end: int) -> None:
    with open(source, "rb") as handle:
        while begin < end:
            copied = os.copy_file_range(handle.fileno(), fd, end - begin, begin)
            if copied == 0:
                raise ValueError(f"{source} ends before byte {end}")
            begin += copied
