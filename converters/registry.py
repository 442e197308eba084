"""The foreign formats adapterkit converts to and from, what each can do, and how an input's format is detected.

Each format is one module of this package with ``detect(path) -> bool``, ``read(path, base=None) -> Adapter`` and
``write(adapter, path, base=None, inputs=())``; :data:`FORMATS` declares which of reading and writing it does, so the
``convert`` command's choices and the Hub's extra files (``push --with-<format>``) follow from this table.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from adapterkit.errors import FileSystemError, FormatError, RequestError


@dataclass(frozen=True)
class Format:
    name: str
    module: str  #: under adapterkit.converters
    reads: bool
    writes: bool
    #: whether ``push --with-<name>`` uploads the adapter in this format beside ours
    on_hub: bool
    description: str
    #: for a format that is one file, its name in a Hub repository (None: the format is a folder of files)
    hub_file: str | None = None


FORMATS: dict[str, Format] = {f.name: f for f in (
    # before peft: an AdapterHub folder has an adapter_config.json too (detection tries the formats in this order)
    Format("adapterhub", "adapterhub", reads=True, writes=False, on_hub=False,
           description="AdapterHub bottleneck adapter folder (adapter_config.json + adapter.safetensors)"),
    Format("peft", "peft", reads=True, writes=True, on_hub=True,
           description="PEFT folder (adapter_config.json + adapter_model.safetensors)"),
    Format("onnx-adapter", "onnx_adapter", reads=False, writes=True, on_hub=False,
           description="ONNX Runtime .onnx_adapter file (for a graph from export --onnx --unmerged)"),
    Format("gguf", "gguf", reads=True, writes=True, on_hub=False,
           description="llama.cpp GGUF LoRA (.gguf; needs --base, the Hugging Face model the base GGUF came from)"),
)}


def on_hub() -> list[str]:
    """The formats ``push --with-<name>`` can upload beside an adapterkit file."""
    return [name for name, f in FORMATS.items() if f.on_hub]


def readable() -> list[str]:
    return [name for name, f in FORMATS.items() if f.reads]


def writable() -> list[str]:
    return [name for name, f in FORMATS.items() if f.writes]


def converter(format_name: str):
    try:
        return importlib.import_module(f"adapterkit.converters.{FORMATS[format_name].module}")
    except KeyError:
        raise RequestError(f"unknown format {format_name!r} (known: adapterkit, {', '.join(FORMATS)})") from None


def detect_format(path: str | os.PathLike) -> str:
    """``adapterkit`` for our own files (and ``hf://`` references), else the first foreign format that claims it."""
    from adapterkit.io.adapter_file import is_adapter_file

    path = os.fspath(path)
    if path.startswith("hf://"):
        return "adapterkit"
    if not os.path.exists(path):
        raise FileSystemError("no such file or folder", path)
    if os.path.isfile(path) and is_adapter_file(path):
        return "adapterkit"
    for name in FORMATS:
        if converter(name).detect(path):
            return name
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return "adapterkit"  # let the strict reader say what is wrong with it
    raise FormatError(f"unrecognised adapter format (known: adapterkit, {', '.join(FORMATS)})", path)
