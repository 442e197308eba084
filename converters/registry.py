"""The foreign formats adapterkit converts to and from, and how an input's format is detected.

Each format is one module of this package with ``detect(path) -> bool``, ``read(path, base=None) -> Adapter`` and
``write(adapter, path, base=None)``; a format that can only be written raises AdapterError from ``read``.
"""

from __future__ import annotations

import importlib
import os

from adapterkit.errors import AdapterError

#: format name -> module under adapterkit.converters
FORMATS = {
    "peft": "peft",
    "onnx-adapter": "onnx_adapter",
}


def converter(format_name: str):
    try:
        return importlib.import_module(f"adapterkit.converters.{FORMATS[format_name]}")
    except KeyError:
        raise AdapterError(f"unknown format {format_name!r} (known: adapterkit, {', '.join(FORMATS)})") from None


def detect_format(path: str | os.PathLike) -> str:
    """``adapterkit`` for our own files (and ``hf://`` references), else the first foreign format that claims it."""
    path = os.fspath(path)
    if path.startswith("hf://"):
        return "adapterkit"
    if not os.path.exists(path):
        raise AdapterError("no such file or folder", path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                if "adapterkit.format_version" in (handle.metadata() or {}):
                    return "adapterkit"
        except Exception:
            pass
    for name in FORMATS:
        if converter(name).detect(path):
            return name
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return "adapterkit"  # let the strict reader say what is wrong with it
    raise AdapterError(f"unrecognised adapter format (known: adapterkit, {', '.join(FORMATS)})", path)
