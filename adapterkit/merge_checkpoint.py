"""Merge adapters into a Hugging Face model folder on disk, streamed tensor by tensor, and unmerge them again.

The output folder has the base's layout (the same shard files holding the same tensors, an index when the base has
one, its config, tokenizer and generation files), so ``from_pretrained`` loads it. Each tensor is read memory-mapped
from the base, changed in float32 (:class:`adapterkit.merge.MergePlan`), cast to the checkpoint's dtype (or the one
asked for) and appended to its output shard at once (:mod:`adapterkit.safetensors_writer`); tensors no adapter
touches are copied byte for byte by the kernel. Memory stays near a few tensors, plus the pages of the shard being
read that the OS keeps mapped (counted in the resident size; at most one shard), whatever the model size. Everything is written into a temporary folder beside the output and renamed
into place at the end, so a failure leaves nothing half-written.

``adapterkit_merge.json`` in the output records which adapters were merged (content sha256, weight, base
fingerprint), so ``unmerge`` can check what it takes out, and a person can see what a folder holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from adapterkit.adapter import Adapter
from adapterkit.checkpoint import INDEX_FILE, Checkpoint
from adapterkit.errors import AdapterError
from adapterkit.fileformat import DTYPES
from adapterkit.fingerprint import check_base, fingerprint
from adapterkit.merge import MergePlan
from adapterkit.safetensors_writer import StreamedSafetensorsWriter, data_offsets
from adapterkit.sources import load_adapter

log = logging.getLogger(__name__)

RECORD_FILE = "adapterkit_merge.json"
#: weight files of any format: never copied from the base, since they would hold the unmerged weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def merge_checkpoint(base_dir, adapters: Sequence, out_dir, weights: Sequence[float] | None = None,
                     dtype: str | torch.dtype | None = None, force: bool = False, overwrite: bool = False) -> Path:
    """Write ``base_dir`` with ``adapters`` (paths, ``hf://`` refs or Adapter values; each times its weight) folded
    in to ``out_dir``. Refuses adapters made for another base unless ``force``, and a non-empty ``out_dir`` unless
    ``overwrite``."""
    loaded = _load(adapters)
    weights = _weights(loaded, weights)
    record = _read_record(base_dir)
    for source, adapter in loaded:
        # A folder that already holds merged adapters is checked against the base they were merged into.
        recorded = record.get("base_fingerprint")
        if recorded is None or recorded != adapter.manifest.base_model.fingerprint:
            check_base(adapter, base_dir, source, force)
    base_fingerprint = fingerprint(base_dir)
    record["merged"] += [
        {"source": source, "sha256": adapter.content_sha256(), "weight": weight,
         "base_fingerprint": adapter.manifest.base_model.fingerprint}
        for (source, adapter), weight in zip(loaded, weights)
    ]
    record.setdefault("base_fingerprint", base_fingerprint)
    return _rewrite(base_dir, [a for _, a in loaded], weights, 1.0, out_dir, dtype, overwrite, record)


def unmerge_checkpoint(merged_dir, adapters: Sequence, out_dir, weights: Sequence[float] | None = None,
                       dtype: str | torch.dtype | None = None, force: bool = False, overwrite: bool = False) -> Path:
    """Write ``merged_dir`` with ``adapters`` (same weights as when merged) subtracted to ``out_dir``. Refuses an
    adapter that the folder's merge record does not list (with that weight) unless ``force``."""
    loaded = _load(adapters)
    weights = _weights(loaded, weights)
    record = _read_record(merged_dir)
    for (source, adapter), weight in zip(loaded, weights):
        entry = next((e for e in record["merged"]
                      if e["sha256"] == adapter.content_sha256() and abs(e["weight"] - weight) < 1e-12), None)
        if entry is not None:
            record["merged"].remove(entry)
        elif not force:
            raise AdapterError(f"{RECORD_FILE} does not list {source} merged with weight {weight}: "
                               "use --force to subtract it anyway", merged_dir)
    return _rewrite(merged_dir, [a for _, a in loaded], weights, -1.0, out_dir, dtype, overwrite, record)


def _load(adapters: Sequence) -> list[tuple[str, Adapter]]:
    return [(f"adapter {n}", a) if isinstance(a, Adapter) else (os.fspath(a), load_adapter(a))
            for n, a in enumerate(adapters, 1)]


def _weights(loaded, weights) -> list[float]:
    if weights is None:
        return [1.0] * len(loaded)
    if len(weights) != len(loaded):
        raise AdapterError(f"{len(weights)} weights given for {len(loaded)} adapters")
    return [float(w) for w in weights]


def _read_record(folder) -> dict:
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return {"merged": []}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("merged"), list):
            raise ValueError
        return record
    except (OSError, ValueError, AttributeError):
        raise AdapterError("not a valid merge record", path) from None


def _output_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return OUTPUT_DTYPES[dtype]
    except KeyError:
        raise AdapterError(f"unknown dtype {dtype!r} (choose {', '.join(OUTPUT_DTYPES)})") from None


def _rewrite(source_dir, adapters, weights, sign, out_dir, dtype, overwrite, record) -> Path:
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    dtype = _output_dtype(dtype)
    if not source_dir.is_dir():
        raise AdapterError("the base must be a model folder (config.json and safetensors weights)", source_dir)
    if out_dir.resolve() == source_dir.resolve():
        raise AdapterError("the output folder is the input folder: the input is never modified", out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise AdapterError("output exists and is not an empty folder (use --overwrite to replace it)", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        with Checkpoint(source_dir) as checkpoint:
            plan = MergePlan(adapters, weights, checkpoint.names(), sign=sign)
            _write_shards(checkpoint, plan, temporary, dtype, sign)
        _copy_other_files(source_dir, temporary, dtype)
        if record["merged"]:
            (temporary / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out_dir


def _write_shards(checkpoint: Checkpoint, plan: MergePlan, out: Path, dtype: torch.dtype | None, sign: float) -> None:
    layout: dict[Path, list[tuple[str, torch.dtype, list[int]]]] = {}
    stored_dtypes: dict[str, torch.dtype] = {}
    for name in sorted(checkpoint.names()):
        view = checkpoint.slice(name)
        stored = stored_dtypes[name] = DTYPES[view.get_dtype()]
        layout.setdefault(checkpoint.shard_of[name], []).append(
            (name, dtype if dtype is not None and stored.is_floating_point else stored, list(view.get_shape())))
    last_shard = checkpoint.shards[-1]
    for name, tensor in sorted(plan.additions.items()):
        log.warning("%s is not in the base: added to %s", name, last_shard.name)
        layout[last_shard].append((name, dtype or tensor.dtype, list(tensor.shape)))
    total = sum(torch.Size(shape).numel() * d.itemsize for entries in layout.values() for _, d, shape in entries)
    buffers = _WorkBuffers()
    with tqdm(total=total, unit="B", unit_scale=True, desc="merge" if sign > 0 else "unmerge") as progress:
        for shard, entries in layout.items():
            offsets = data_offsets(shard)
            with StreamedSafetensorsWriter(out / shard.name, entries, checkpoint.metadata(shard)) as writer:
                for name, out_dtype, shape in entries:
                    if name in checkpoint and not plan.touches(name) and out_dtype == stored_dtypes[name]:
                        writer.copy(name, shard, *offsets[name])  # unchanged: copied byte for byte
                    else:
                        tensor = plan.additions[name] if name not in checkpoint else checkpoint.get(name)
                        buffer = buffers.next(shape) if plan.touches(name) else None
                        writer.write(name, plan.apply(name, tensor, out_dtype, out=buffer))
                    progress.update(torch.Size(shape).numel() * out_dtype.itemsize)
    plan.check_done()
    if checkpoint.is_folder and (checkpoint.path / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: shard.name for shard, entries in layout.items() for name, _, _ in entries}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class _WorkBuffers:
    """Two float32 buffers that changed tensors are computed in, in turn: the writer thread writes one while the next
    tensor is computed in the other. Safe because the writer has at most one write in flight (it finishes the
    previous write before taking the next), and reusing memory spares a page fault per 4 KiB of every tensor."""

    def __init__(self):
        self._flat = [torch.empty(0), torch.empty(0)]
        self._turn = 0

    def next(self, shape: list[int]) -> torch.Tensor:
        self._turn ^= 1
        size = math.prod(shape)
        if self._flat[self._turn].numel() < size:
            self._flat[self._turn] = torch.empty(size)
        return self._flat[self._turn][:size].view(shape)


def _copy_other_files(source_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer, generation config and the like; not weights, not the index or merge record we rewrite."""
    for path in source_dir.iterdir():
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES) or path.name in (INDEX_FILE, RECORD_FILE):
            continue
        shutil.copy2(path, out / path.name)
    config = out / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        data["dtype" if "torch_dtype" not in data else "torch_dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _move_into_place(temporary: Path, out_dir: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(temporary, out_dir)
        return
    previous = out_dir.with_name(f".{out_dir.name}.previous")
    os.replace(out_dir, previous)
    os.replace(temporary, out_dir)
    if previous.is_dir():
        shutil.rmtree(previous)
    else:
        previous.unlink()
