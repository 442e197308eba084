"""Where adapters come from: a local path, or ``hf://REPO_ID[@REV][/FILE]`` on the Hugging Face Hub.

Every command that takes an adapter goes through :func:`load_adapter`, so a Hub reference works wherever a path does.
"""

from __future__ import annotations

import os

from adapterkit.adapter import Adapter
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
    return load(local_path(ref))


def load_adapters(refs) -> list[Adapter]:
    return [load_adapter(ref) for ref in refs]
