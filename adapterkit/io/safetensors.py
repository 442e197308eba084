"""The safetensors container, read strictly and written reproducibly, with numpy only.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header (each tensor's dtype, shape
and byte range, plus an optional ``__metadata__`` string map) and the data buffer. This module is the one parser of
that container: adapter files (:mod:`adapterkit.io.adapter_file`) and base checkpoints
(:mod:`adapterkit.io.checkpoint`) both go through :func:`read_header`. It trusts nothing: the header size is capped,
the JSON is parsed under the spec's rules (:func:`strict_json`: no duplicate keys, no NaN, bounded integers and
nesting), and the byte ranges must tile the data buffer exactly (spec §3.2). Tensors are numpy views of a
copy-on-write memory map, so nothing is read before it is used and the file is never modified.

Writing: :func:`write_file` writes a whole file with the header keys in a fixed order (``safetensors``' own writer
orders metadata by a Rust HashMap, different each run); :class:`StreamedWriter` writes the header first and each
tensor as soon as it is computed, on a background thread, so no more than one tensor is ever held in memory, and
copies tensors left unchanged from their source file by the kernel (``copy_file_range``, with a plain copy where the
kernel cannot: another file system, an old kernel). Streamed files are not fsync'ed, like ``save_pretrained`` and
``cp``: what guards the user is the rename of a finished output into place (:mod:`adapterkit.io.outputs`).
"""

from __future__ import annotations

import collections
import errno
import json
import math
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from adapterkit.arrays import DTYPES, as_array, dtype_name
from adapterkit.errors import FormatError
from adapterkit.io.paths import open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024
#: at most this many dimensions per tensor (torch's own limit is 64)
MAX_DIMENSIONS = 8
#: JSON integers must fit in 64 bits; JSON values nest at most this deep (spec §4.3)
MAX_JSON_INTEGER = 2**64
MAX_JSON_DEPTH = 32
#: errors of copy_file_range that mean "the kernel cannot do it here": fall back to a plain copy
NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its dtype name, shape and byte range in the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Header:
    metadata: dict | None
    entries: dict[str, Entry]
    data_start: int  #: file offset of the data buffer


def map_file(path: str | os.PathLike) -> mmap.mmap | bytes:
    """A regular file, memory-mapped copy-on-write (never written back); ``b""`` for an empty file."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""


def read_header(buffer, *, allow_empty: bool = False) -> Header:
    """Parse and check the header of a whole file held in ``buffer`` (bytes or a memory map). ``allow_empty``
    admits tensors with a zero dimension (checkpoints may hold them; adapter files may not)."""
    size = len(buffer)
    if size < 8:
        raise FormatError(f"file is {size} bytes, too short to hold a safetensors header (truncated?)")
    (header_length,) = struct.unpack("<Q", buffer[:8])
    if header_length > MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_length} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + header_length > size:
        raise FormatError(f"header length {header_length} runs past the end of the file ({size} bytes; truncated?)")
    header = strict_json(bytes(buffer[8 : 8 + header_length]), "header")
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + header_length
    return Header(metadata, _check_entries(header, size - data_start, allow_empty), data_start)


def tensor(buffer, header: Header, name: str) -> np.ndarray:
    """Tensor ``name`` as a numpy view of ``buffer`` (no copy)."""
    entry = header.entries[name]
    dtype = DTYPES[entry.dtype]
    count = (entry.end - entry.begin) // dtype.itemsize
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=header.data_start + entry.begin).reshape(entry.shape)


def strict_json(text: str | bytes, what: str):
    """Parse JSON as the spec allows it: no duplicate keys, no NaN or Infinity, integers within 64 bits, nesting
    at most MAX_JSON_DEPTH deep. Raises FormatError naming ``what`` (the header or the manifest)."""

    def no_duplicates(pairs):
        mapping = dict(pairs)
        if len(mapping) != len(pairs):
            seen = set()
            duplicated = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise FormatError(f"{what} names {duplicated!r} twice")
        return mapping

    def refuse_constant(name):
        raise FormatError(f"{what} holds {name}, which JSON does not allow")

    def finite_float(text):
        value = float(text)
        if not math.isfinite(value):
            raise FormatError(f"{what} holds the number {text}, too large for a 64-bit float")
        return value

    def bounded_int(text):
        if len(text) > 21 or abs(int(text)) >= MAX_JSON_INTEGER:
            raise FormatError(f"{what} holds the integer {text[:24]}, which does not fit in 64 bits")
        return int(text)

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=refuse_constant,
                           parse_float=finite_float, parse_int=bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise FormatError(f"{what} is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise FormatError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_entries(header: dict, data_size: int, allow_empty: bool) -> dict[str, Entry]:
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: entry must hold exactly dtype, shape and data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise FormatError(f"tensor {name!r}: unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if len(shape) > MAX_DIMENSIONS:
            raise FormatError(f"tensor {name!r} has {len(shape)} dimensions, more than {MAX_DIMENSIONS}")
        if 0 in shape and not allow_empty:
            raise FormatError(f"tensor {name!r} has no elements (shape {shape})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise FormatError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end < begin or end - begin != expected:
            raise FormatError(f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, "
                              f"but shape {shape} of {info['dtype']} needs {expected}")
        entries[name] = Entry(name, info["dtype"], tuple(shape), begin, end)
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin > position:
            raise FormatError(f"data offsets leave a gap at byte {position} before tensor {entry.name!r}")
        if entry.begin < position:
            raise FormatError(f"tensor {entry.name!r} overlaps the tensor before it at byte {entry.begin}")
        position = entry.end
    if position > data_size:
        raise FormatError(f"tensor data needs {position} bytes but the data buffer holds {data_size} (truncated?)")
    if position < data_size:
        raise FormatError(f"{data_size - position} bytes of the data buffer after the last tensor belong to none")
    return entries


# -- writing ------------------------------------------------------------------------------------------------------------


def _header_bytes(entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (numpy arrays or torch tensors) in name order, with ``metadata``, byte for byte the same for
    the same input."""
    arrays = {name: as_array(tensors[name]) for name in sorted(tensors)}
    arrays = {name: np.ascontiguousarray(a).reshape(a.shape) for name, a in arrays.items()}  # 0-d stays 0-d
    with StreamedWriter(path, [(n, dtype_name(a.dtype), list(a.shape)) for n, a in arrays.items()], metadata) as out:
        for name, array in arrays.items():
            out.write(name, array)


class StreamedWriter:
    """Write a safetensors file one tensor at a time. ``entries`` are ``(name, dtype name, shape)`` in the order the
    tensors will be written; the file is created with the permissions the user's umask gives."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, list[int]]],
                 metadata: dict[str, str] | None = None):
        self._expected = collections.deque((name, dtype, list(shape)) for name, dtype, shape in entries)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._in_flight: Future | None = None
        self._submit(_write_all, self._fd, _header_bytes(list(self._expected), metadata))

    def _next(self, name: str, nbytes: int) -> None:
        expected_name, dtype, shape = self._expected.popleft()
        expected_bytes = math.prod(shape) * DTYPES[dtype].itemsize
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

    def write(self, name: str, value) -> None:
        """Write the next tensor (a numpy array or torch tensor, of the dtype and shape announced)."""
        array = as_array(value)
        array = np.ascontiguousarray(array).reshape(array.shape)  # a 0-d tensor stays 0-d
        _, dtype, shape = self._expected[0]
        if (dtype_name(array.dtype), list(array.shape)) != (dtype, shape):
            raise ValueError(f"{name}: expected {dtype} {shape}, got {dtype_name(array.dtype)} {list(array.shape)}")
        self._next(name, array.nbytes)
        if array.size:
            self._submit(_write_all, self._fd, array.reshape(-1).view(np.uint8))  # little-endian, as numpy stores it

    def copy(self, name: str, source: str | os.PathLike, begin: int, end: int) -> None:
        """Write the next tensor by copying bytes ``[begin, end)`` of file ``source`` (a tensor left unchanged)."""
        self._next(name, end - begin)
        self._submit(copy_range, os.fspath(source), self._fd, begin, end)

    def close(self) -> None:
        try:
            self._wait()
            if self._expected:
                raise ValueError(f"{len(self._expected)} tensors were never written, the first {self._expected[0][0]}")
        finally:
            self._io.shutdown()
            os.close(self._fd)

    def __enter__(self) -> "StreamedWriter":
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


def copy_range(source: str, fd: int, begin: int, end: int) -> None:
    """Append bytes ``[begin, end)`` of ``source`` to ``fd``: by the kernel (``copy_file_range``) where it can, else
    by a plain read and write (across file systems, or where the kernel lacks the call)."""
    with open_regular(source) as handle:
        kernel = hasattr(os, "copy_file_range")
        while begin < end:
            if kernel:
                try:
                    copied = os.copy_file_range(handle.fileno(), fd, end - begin, begin)
                except OSError as exc:
                    if exc.errno not in NO_KERNEL_COPY:
                        raise
                    kernel = False
                    continue
            else:
                chunk = os.pread(handle.fileno(), min(COPY_CHUNK, end - begin), begin)
                _write_all(fd, chunk)
                copied = len(chunk)
            if copied == 0:
                if kernel:  # some file systems answer 0 rather than an error (as Go's io.Copy knows): copy by hand
                    kernel = False
                    continue
                raise FormatError(f"file ends before byte {end}", source)
            begin += copied
