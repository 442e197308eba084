"""The sha256 of a file's bytes (what composites, merge records and Hub records name their sources by)."""

from __future__ import annotations

import hashlib
import os

from adapterkit.io.paths import open_regular


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
