"""The foreign formats adapterkit converts to and from, what each can do, and how an input's format is detected.

Each format is one module of this package with ``detect(path) -> bool``, ``read(path, base=None) -> Adapter`` and
``write(adapter, path, base=None, inputs=())``; :data:`FORMATS` declares which of reading and writing it does, so the
``convert`` command's choices and the Hub's extra files (``push --with-<format>``) follow from this table.

:func:`detect_format` names what it sees: ``adapterkit``, a format of :data:`FORMATS`, or it refuses in one line saying what the input is
("unknown: ..."; a pickle; an adapter file of a format no converter reads). :func:`foreign_hint` tells a command that
wanted an adapterkit file which conversion to run instead.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from adapterkit.errors import AdapterError, FileSystemError, FormatError, RequestError
from adapterkit.io import safetensors
from adapterkit.io.paths import open_regular


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
    #: whether reading it needs the base model (``convert --base``)
    needs_base: bool = False


FORMATS: dict[str, Format] = {f.name: f for f in (
    # before peft: an AdapterHub folder has an adapter_config.json too (detection tries the formats in this order)
    Format("adapterhub", "adapterhub", reads=True, writes=False, on_hub=False,
           description="AdapterHub adapter folder, bottleneck, LoRA or (IA)³ "
                       "(adapter_config.json + adapter.safetensors)"),
    Format("peft", "peft", reads=True, writes=True, on_hub=True,
           description="PEFT folder (adapter_config.json + adapter_model.safetensors)"),
    Format("kohya", "kohya", reads=True, writes=True, on_hub=False, needs_base=True,
           description="kohya-ss / A1111 / ComfyUI LoRA file (lora_unet_…, lora_te_…; reading needs --base)"),
    Format("diffusers", "diffusers", reads=True, writes=True, on_hub=False,
           description="diffusers LoRA (pytorch_lora_weights.safetensors, PEFT-style or the older layout)"),
    Format("onnx-adapter", "onnx_adapter", reads=False, writes=True, on_hub=False,
           description="ONNX Runtime .onnx_adapter file (for a graph from export --onnx --unmerged)"),
    Format("gguf", "gguf", reads=True, writes=True, on_hub=False, needs_base=True,
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


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def detect_format(path: str | os.PathLike) -> str:
    """``adapterkit`` for our own files (and ``hf://`` references), else the first foreign format that claims it;
    anything else is refused, saying what it is."""
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
    if os.path.isfile(path) and path.endswith(".safetensors") and not _parses(path):
        return "adapterkit"  # a broken safetensors file: let the strict reader say what is wrong with it
    raise FormatError(_unknown(path), path)


def _parses(path: str) -> bool:
    try:
        safetensors.read_header(safetensors.map_file(path), allow_empty=True)
        return True
    except AdapterError:
        return False


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open_regular(path) as handle:
            return handle.read(len(magic)) == magic
    except AdapterError:
        return False


def _unknown(path: str) -> str:
    """What an input no format claims is, in one line."""
    known = f"adapterkit, {', '.join(readable())}"
    if os.path.isdir(path):
        return f"unknown: a folder holding no adapter this adapterkit reads (known formats: {known})"
    if path.endswith(PICKLE_SUFFIXES) or _starts_with(path, b"PK\x03\x04") or _starts_with(path, b"\x80"):
        return ("a pickle (PyTorch .ckpt/.pt/.bin), which adapterkit never loads: re-save the adapter as "
                ".safetensors with the tool that made it")
    try:
        header = safetensors.read_header(safetensors.map_file(path), allow_empty=True)
    except AdapterError:
        return f"unknown: neither a safetensors file nor a GGUF file (known formats: {known})"
    first = next(iter(sorted(header.entries)), None)
    return ("unknown: a safetensors file without an adapterkit manifest whose tensor names match no adapter format "
            f"adapterkit reads ({f'first tensor {first!r}' if first else 'no tensors'}; known formats: {known})")


def describe(name: str) -> str:
    return FORMATS[name].description if name in FORMATS else name


def readable_format(name: str, path) -> None:
    """Refuse, naming the input's format, an input no registered converter reads."""
    if name not in FORMATS:
        raise RequestError(f"is a {describe(name)}: this adapterkit has no converter that reads it", path)
    if not FORMATS[name].reads:
        raise RequestError(f"{name} files can be written, not read", path)


def foreign_hint(path: str | os.PathLike) -> str | None:
    """For an input that is not an adapterkit file: which conversion makes one (None when it is one, or unknown)."""
    try:
        name = detect_format(path)
    except AdapterError:
        return None
    if name == "adapterkit":
        return None
    if name not in FORMATS or not FORMATS[name].reads:
        return f"it is a {describe(name)}, which this adapterkit cannot read"
    base = " --base BASE" if FORMATS[name].needs_base else ""
    return (f"it is a {name} adapter ({describe(name)}): convert it first, "
            f"adapterkit convert {os.fspath(path)}{base} -o adapter.safetensors")
