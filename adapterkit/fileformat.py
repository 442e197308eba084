"""Reading and writing adapter files: strict safetensors with an adapterkit manifest (spec/SPEC.md).

The reader trusts nothing: it caps the header size, parses the header itself, requires the data offsets to tile the
data buffer exactly, checks the version before the manifest, and only then memory-maps the tensor data (copy-on-write,
so the file is never modified). It never unpickles. Every problem raises :class:`AdapterError` naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from pathlib import Path

import torch

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError
from adapterkit.manifest import SUPPORTED_MAJOR, Manifest, parse_version

VERSION_KEY = "adapterkit.format_version"
MANIFEST_KEY = "adapterkit.manifest"
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: at most this many dimensions per tensor (torch's own limit is 64)
MAX_DIMENSIONS = 8
#: JSON integers must fit in 64 bits; JSON values nest at most this deep (spec §4)
MAX_JSON_INTEGER = 2**64
MAX_JSON_DEPTH = 32

#: safetensors dtype names -> torch dtypes. Others are refused by name (spec §3).
DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def load(path: str | os.PathLike) -> Adapter:
    """Read and validate an adapter file. Raises AdapterError naming ``path`` on any problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    except OSError as exc:
        raise AdapterError(f"cannot read: {exc.strerror or exc}", path) from None
    return parse(buffer, path)


def parse(buffer: bytes | bytearray | mmap.mmap, path: str = "<bytes>") -> Adapter:
    """Parse a whole adapter file held in ``buffer`` (bytes or a memory map)."""
    try:
        return _parse(buffer)
    except AdapterError as exc:
        raise AdapterError(exc.reason, path) from None


def _parse(buffer) -> Adapter:
    size = len(buffer)
    if size < 8:
        raise AdapterError(f"file is {size} bytes, too short to hold a safetensors header (truncated?)")
    (header_length,) = struct.unpack("<Q", buffer[:8])
    if header_length > MAX_HEADER_BYTES:
        raise AdapterError(f"header length {header_length} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + header_length > size:
        raise AdapterError(f"header length {header_length} runs past the end of the file ({size} bytes; truncated?)")
    header = _parse_header(bytes(buffer[8 : 8 + header_length]))
    metadata = header.pop("__metadata__", None)
    data_start = 8 + header_length
    entries = _check_entries(header, size - data_start)
    manifest = _read_manifest(metadata)
    tensors = {name: _tensor(buffer, data_start, *entry) for name, entry in entries.items()}
    adapter = Adapter(manifest, tensors)
    adapter.validate()
    return adapter


def strict_json(text: str | bytes, what: str):
    """Parse JSON as the spec allows it: no duplicate keys, no NaN or Infinity, integers within 64 bits, nesting
    at most MAX_JSON_DEPTH deep. Raises AdapterError naming ``what`` (the header or the manifest)."""

    def no_duplicates(pairs):
        mapping = dict(pairs)
        if len(mapping) != len(pairs):
            seen = set()
            duplicated = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise AdapterError(f"{what} names {duplicated!r} twice")
        return mapping

    def refuse_constant(name):
        raise AdapterError(f"{what} holds {name}, which JSON does not allow")

    def finite_float(text):
        value = float(text)
        if not math.isfinite(value):
            raise AdapterError(f"{what} holds the number {text}, too large for a 64-bit float")
        return value

    def bounded_int(text):
        if len(text) > 21 or abs(int(text)) >= MAX_JSON_INTEGER:
            raise AdapterError(f"{what} holds the integer {text[:24]}, which does not fit in 64 bits")
        return int(text)

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=refuse_constant,
                           parse_float=finite_float, parse_int=bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterError(f"{what} is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise AdapterError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
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


def _parse_header(raw: bytes) -> dict:
    header = strict_json(raw, "header")
    if not isinstance(header, dict):
        raise AdapterError("header is not a JSON object")
    return header


def _check_entries(header: dict, data_size: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise AdapterError(f"tensor {name!r}: entry must hold exactly dtype, shape and data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise AdapterError(f"tensor {name!r}: unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise AdapterError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if len(shape) > MAX_DIMENSIONS:
            raise AdapterError(f"tensor {name!r} has {len(shape)} dimensions, more than {MAX_DIMENSIONS}")
        if 0 in shape:
            raise AdapterError(f"tensor {name!r} has no elements (shape {shape})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise AdapterError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end < begin or end - begin != expected:
            raise AdapterError(
                f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, "
                f"but shape {shape} of {info['dtype']} needs {expected}"
            )
        entries[name] = (dtype, shape, begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin > position:
            raise AdapterError(f"data offsets leave a gap at byte {position} before tensor {name!r}")
        if begin < position:
            raise AdapterError(f"tensor {name!r} overlaps the tensor before it at byte {begin}")
        position = end
    if position > data_size:
        raise AdapterError(f"tensor data needs {position} bytes but the data buffer holds {data_size} (truncated?)")
    if position < data_size:
        raise AdapterError(f"{data_size - position} bytes of the data buffer after the last tensor belong to none")
    return entries


def _read_manifest(metadata) -> Manifest:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        if metadata is None:
            raise AdapterError("no adapterkit manifest: the file has no __metadata__ (not an adapterkit file?)")
        raise AdapterError("__metadata__ must map strings to strings")
    if VERSION_KEY not in metadata:
        raise AdapterError(f"no adapterkit manifest: __metadata__ lacks {VERSION_KEY!r} (not an adapterkit file?)")
    version = metadata[VERSION_KEY]
    try:
        major, _ = parse_version(version)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    if major != SUPPORTED_MAJOR:
        raise AdapterError(
            f"format version {version} is not supported: this adapterkit reads {SUPPORTED_MAJOR}.x"
            + ("; upgrade adapterkit" if major > SUPPORTED_MAJOR else "")
        )
    if MANIFEST_KEY not in metadata:
        raise AdapterError(f"no adapterkit manifest: __metadata__ lacks {MANIFEST_KEY!r}")
    data = strict_json(metadata[MANIFEST_KEY], "manifest")
    from adapterkit.validation import check_manifest_json

    check_manifest_json(data)
    return Manifest.from_json(data, format_version=version)


def _tensor(buffer, data_start: int, dtype: torch.dtype, shape: list[int], begin: int, end: int) -> torch.Tensor:
    count = (end - begin) // dtype.itemsize
    flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=data_start + begin)
    return flat.view(shape)


def save(adapter: Adapter, path: str | os.PathLike) -> None:
    """Validate ``adapter`` and write it to ``path`` atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    try:
        adapter.validate()
    except AdapterError as exc:
        raise AdapterError(f"refusing to write an invalid adapter: {exc.reason}", path) from None
    metadata = {VERSION_KEY: adapter.manifest.written_version(), MANIFEST_KEY: adapter.manifest.dumps()}
    tensors = {name: t.detach().contiguous() for name, t in adapter.tensors.items()}
    write_atomically(path, lambda tmp: _write_safetensors(tmp, tensors, metadata))


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with a byte-for-byte reproducible header: ``safetensors.torch.save_file`` writes the
    metadata from a Rust HashMap, whose key order changes from run to run. Tensors go in name order."""
    from adapterkit.safetensors_writer import StreamedSafetensorsWriter

    names = sorted(tensors)
    with StreamedSafetensorsWriter(path, [(n, tensors[n].dtype, list(tensors[n].shape)) for n in names],
                                   metadata) as writer:
        for name in names:
            writer.write(name, tensors[name])


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call ``write(temporary_path)`` for a file beside ``path``, then rename it into place; on failure, remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the permissions open() would
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
