"""Lazy, read-only access to a base model's weights on disk: a Hugging Face model folder (one ``model.safetensors``
or shards plus ``model.safetensors.index.json``; a diffusers model folder's ``diffusion_pytorch_model.safetensors``
and its index the same way) or a single ``.safetensors`` file.

Every shard goes through the one safetensors parser (:mod:`adapterkit.io.safetensors`) and is memory-mapped
copy-on-write; a tensor is a numpy view of the map, read when used, so a 70B checkpoint is processed in the memory of
the tensors in use (mergekit's lazy loader works the same way). No framework is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from adapterkit.errors import AdapterError, FileSystemError, FormatError
from adapterkit.io import safetensors
from adapterkit.io.paths import open_regular

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: (single file, index) of a model folder: transformers' names, then diffusers'
LAYOUTS = ((SINGLE_FILE, INDEX_FILE),
           ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"))
INDEX_FILES = tuple(index for _, index in LAYOUTS)


class Shard:
    """One safetensors file of a checkpoint: its header, and its bytes mapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.buffer = safetensors.map_file(path)
            self.header = safetensors.read_header(self.buffer, allow_empty=True)
        except AdapterError as exc:
            raise exc.at(path) from None

    def tensor(self, name: str) -> np.ndarray:
        return safetensors.tensor(self.buffer, self.header, name)


class Checkpoint:
    """The tensors of a safetensors checkpoint, by name, read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._shards: dict[Path, Shard] = {}
        #: the index file of a sharded folder (None for a single file)
        self.index_name: str | None = None
        self.shard_of: dict[str, Path] = self._index()

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self.shard_of.values()))

    def _index(self) -> dict[str, Path]:
        if self.path.is_file():
            return {name: self.path for name in self._open(self.path).header.entries}
        for single, index in LAYOUTS:
            if (self.path / index).is_file():
                try:
                    with open_regular(self.path / index) as handle:
                        weight_map = json.load(handle)["weight_map"]
                    self.index_name = index
                    return {name: self.path / os.path.basename(shard) for name, shard in weight_map.items()}
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    raise FormatError(f"{index} is not a safetensors index", self.path) from None
            if (self.path / single).is_file():
                return {name: self.path / single for name in self._open(self.path / single).header.entries}
        if self.path.is_dir():
            from adapterkit.io.pipeline import is_pipeline

            if is_pipeline(self.path):
                raise FormatError("is a diffusers pipeline folder (model_index.json): give one of its model folders "
                                  "(unet/, transformer/, text_encoder/)", self.path)
            raise FormatError(f"no {SINGLE_FILE} or {INDEX_FILE} in this folder (nor diffusers' "
                              f"{LAYOUTS[1][0]}; only safetensors weights are read)", self.path)
        if os.path.exists(self.path):
            raise FileSystemError("is not a model folder or a safetensors file", self.path)
        raise FileSystemError("no such file or folder", self.path)

    def _open(self, path: Path) -> Shard:
        if path not in self._shards:
            self._shards = {path: Shard(path)}  # one shard mapped at a time
        return self._shards[path]

    def names(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def entry(self, name: str) -> safetensors.Entry:
        """A tensor's dtype name, shape and byte range."""
        shard = self._open(self.shard_of[name])
        try:
            return shard.header.entries[name]
        except KeyError:
            raise FormatError(f"the index names {name!r} in {shard.path.name}, which does not hold it",
                              self.path) from None

    def get(self, name: str) -> np.ndarray:
        """The whole tensor, as a numpy view of the mapped file (read when used)."""
        self.entry(name)
        return self._open(self.shard_of[name]).tensor(name)

    def file_offsets(self, name: str) -> tuple[int, int]:
        """Where the tensor's bytes lie in its shard file (absolute offsets)."""
        entry = self.entry(name)
        start = self._open(self.shard_of[name]).header.data_start
        return start + entry.begin, start + entry.end

    def metadata(self, shard: Path) -> dict[str, str] | None:
        return self._open(shard).header.metadata

    def close(self) -> None:
        self._shards = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
