"""Where adapters come from: a local path, or ``hf://REPO_ID[@REV][/FILE]`` on the Hugging Face Hub.

Every command that takes an adapter goes through :func:`load_adapter`, so a Hub reference works wherever a path does.
"""

from __future__ import annotations

import os

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError, FileSystemError, FormatError
from adapterkit.io.adapter_file import load

HUB_SCHEME = "hf://"


def local_path(ref: str | os.PathLike) -> str:
    """A local file for ``ref``, downloading it through the Hub client's cache when it is an ``hf://`` reference."""
    ref = os.fspath(ref)
    if ref.startswith(HUB_SCHEME):
        from adapterkit.hub import download

        return download(ref)
    return ref


def load_adapter(ref: str | os.PathLike) -> Adapter:
    """The adapterkit file ``ref`` names; a foreign adapter (a PEFT folder, a kohya file) is refused saying which
    ``convert`` makes one of it."""
    path = local_path(ref)
    try:
        return load(path)
    except AdapterError as exc:
        from adapterkit.converters.registry import foreign_hint

        hint = foreign_hint(path) if not isinstance(exc, FileSystemError) or os.path.isdir(path) else None
        if hint is None:
            raise
        raise FormatError(f"not an adapterkit file: {hint}", path) from None


def load_adapters(refs) -> list[Adapter]:
    return [load_adapter(ref) for ref in refs]
