"""Reading and writing adapter files: strict safetensors with an adapterkit manifest (spec/SPEC.md).

The reader trusts nothing: the container is checked by :func:`adapterkit.io.safetensors.read_header` (header cap,
strict JSON, exact tiling), then the version before the manifest, the manifest against the schema, and every tensor
against its kind's rules. It never unpickles. Every problem raises :class:`~adapterkit.errors.FormatError` naming the
file. The writer validates first and writes atomically (:mod:`adapterkit.io.outputs`), fsync'ed.
"""

from __future__ import annotations

import os

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError, FormatError
from adapterkit.io import safetensors
from adapterkit.io.outputs import write_file_atomically
from adapterkit.manifest import SUPPORTED_MAJOR, Manifest, parse_version

VERSION_KEY = "adapterkit.format_version"
MANIFEST_KEY = "adapterkit.manifest"


def load(path: str | os.PathLike) -> Adapter:
    """Read and validate an adapter file. Raises an AdapterError naming ``path`` on any problem."""
    return parse(safetensors.map_file(path), os.fspath(path))


def parse(buffer, path: str = "<bytes>") -> Adapter:
    """Parse a whole adapter file held in ``buffer`` (bytes or a memory map)."""
    try:
        header = safetensors.read_header(buffer)
        manifest = _read_manifest(header.metadata)
        adapter = Adapter(manifest, {name: safetensors.tensor(buffer, header, name) for name in header.entries})
        adapter.validate()
        return adapter
    except AdapterError as exc:
        raise exc.at(path) from None


def is_adapter_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file whose metadata names an adapterkit format version (not checked further)."""
    try:
        header = safetensors.read_header(safetensors.map_file(path), allow_empty=True)
    except AdapterError:
        return False
    return isinstance(header.metadata, dict) and VERSION_KEY in header.metadata


def _read_manifest(metadata) -> Manifest:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        if metadata is None:
            raise FormatError("no adapterkit manifest: the file has no __metadata__ (not an adapterkit file?)")
        raise FormatError("__metadata__ must map strings to strings")
    if VERSION_KEY not in metadata:
        raise FormatError(f"no adapterkit manifest: __metadata__ lacks {VERSION_KEY!r} (not an adapterkit file?)")
    version = metadata[VERSION_KEY]
    try:
        major, _ = parse_version(version)
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    if major != SUPPORTED_MAJOR:
        raise FormatError(f"format version {version} is not supported: this adapterkit reads {SUPPORTED_MAJOR}.x"
                          + ("; upgrade adapterkit" if major > SUPPORTED_MAJOR else ""))
    if MANIFEST_KEY not in metadata:
        raise FormatError(f"no adapterkit manifest: __metadata__ lacks {MANIFEST_KEY!r}")
    data = safetensors.strict_json(metadata[MANIFEST_KEY], "manifest")
    from adapterkit.validation import check_manifest_json

    check_manifest_json(data)
    return Manifest.from_json(data, format_version=version)


def save(adapter: Adapter, path: str | os.PathLike, *, inputs=()) -> None:
    """Validate ``adapter`` and write it to ``path`` atomically (a temporary file beside it, fsync'ed, then renamed),
    refusing a ``path`` that is, or lies inside, one of ``inputs``."""
    try:
        adapter.validate()
    except AdapterError as exc:
        raise type(exc)(f"refusing to write an invalid adapter: {exc.reason}", path) from None
    metadata = {VERSION_KEY: adapter.manifest.written_version(), MANIFEST_KEY: adapter.manifest.dumps()}
    write_file_atomically(path, lambda tmp: safetensors.write_file(tmp, adapter.tensors, metadata), inputs=inputs,
                          sync=True)
