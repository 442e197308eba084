"""Lazy, read-only access to a base model's weights on disk: a Hugging Face model folder (one ``model.safetensors``
or shards plus ``model.safetensors.index.json``) or a single ``.safetensors`` file.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped), keeping a single shard open, so a
70B checkpoint is processed in the memory of its largest tensor (the approach of mergekit's lazy loader).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adapterkit.errors import AdapterError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a safetensors checkpoint, by name, read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.shard_of: dict[str, Path] = self._index()
        self._open_shard: Path | None = None
        self._handle = None

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self.shard_of.values()))

    def _index(self) -> dict[str, Path]:
        if self.path.is_file():
            return {name: self.path for name in self._names_in(self.path)}
        if (self.path / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise AdapterError(f"{INDEX_FILE} is not a safetensors index", self.path) from None
            return {name: self.path / shard for name, shard in weight_map.items()}
        if (self.path / SINGLE_FILE).is_file():
            return {name: self.path / SINGLE_FILE for name in self._names_in(self.path / SINGLE_FILE)}
        if self.path.is_dir():
            raise AdapterError(f"no {SINGLE_FILE} or {INDEX_FILE} in this folder (only safetensors weights are read)", self.path)
        raise AdapterError("no such file or folder", self.path)

    @staticmethod
    def _names_in(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"not a readable safetensors file ({exc})", file) from None

    def names(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def _shard(self, name: str):
        shard = self.shard_of[name]
        if shard != self._open_shard:
            self.close()
            try:
                self._handle = safe_open(shard, framework="pt").__enter__()
            except (SafetensorError, OSError) as exc:
                raise AdapterError(f"not a readable safetensors file ({exc})", shard) from None
            self._open_shard = shard
        return self._handle

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (memory-mapped by safetensors, copied into memory)."""
        return self._shard(name).get_tensor(name)

    def slice(self, name: str):
        """A lazy view with ``.get_shape()``, ``.get_dtype()`` and ``[...]`` slicing along the first dimensions."""
        return self._shard(name).get_slice(name)

    def metadata(self, shard: Path) -> dict[str, str] | None:
        with safe_open(shard, framework="pt") as handle:
            return handle.metadata()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._open_shard = None, None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
