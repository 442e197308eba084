"""Merge adapters into a Hugging Face model folder on disk, streamed tensor by tensor, and unmerge them again.

The output folder has the base's layout (the same shard files holding the same tensors, an index when the base has
one, its config, tokenizer and generation files), so ``from_pretrained`` loads it. Each tensor is read memory-mapped
from the base, changed in float32 (:class:`adapterkit.merge.MergePlan`, which refuses a result that is not finite),
cast to the checkpoint's dtype (or the one asked for) and appended to its output shard at once
(:class:`adapterkit.io.safetensors.StreamedWriter`); tensors no adapter touches are copied byte for byte by the
kernel. Memory stays near a few tensors, plus the pages of the shard being read that the OS keeps mapped, whatever
the model size. The output goes through :func:`adapterkit.io.outputs.output`: written into a temporary folder beside
it and renamed into place at the end, never over or into an input, one writer at a time.

``adapterkit_merge.json`` in the output records which adapters were merged (content sha256, weight, base
fingerprint), so ``unmerge`` can check what it takes out, and a person can see what a folder holds. What a kind's
inverse needs and the merged weights no longer hold (DoRA's row norms) is kept beside it in
``adapterkit_merge.safetensors``, under each record entry's ``id``.

diffusers folders (:mod:`adapterkit.io.pipeline`): a model folder of diffusers (``unet/`` with
``diffusion_pytorch_model.safetensors``) is merged like a transformers one. A whole pipeline folder
(``model_index.json``) is written with each target merged into its component's folder (targets carry the component's
name: ``unet.…``, ``text_encoder.…``), the other components and files copied. A component folder (``unet/`` inside a
pipeline, or a folder named as a component) takes the targets named after it; the targets of the other components are
left out, with a warning saying how many, and an adapter none of whose targets land there is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from adapterkit.adapter import Adapter
from adapterkit.arrays import DTYPES, FLOAT_NAMES, dtype_name, to_torch
from adapterkit.errors import FileSystemError, FormatError, RequestError
from adapterkit.fingerprints import check_base, fingerprints
from adapterkit.io import pipeline
from adapterkit.io.checkpoint import INDEX_FILES, Checkpoint
from adapterkit.io.outputs import output
from adapterkit.io.paths import open_regular
from adapterkit.io import safetensors
from adapterkit.io.safetensors import StreamedWriter, strict_json
from adapterkit.merge import MergePlan
from adapterkit.sources import load_adapter, local_path
from adapterkit.values import check_weights, number

log = logging.getLogger(__name__)

RECORD_FILE = "adapterkit_merge.json"
KEPT_FILE = "adapterkit_merge.safetensors"
#: weight files of any format: never copied from the base, since they would hold the unmerged weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: safetensors dtype names <-> torch dtypes
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                "BOOL": torch.bool}
TORCH_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def merge_checkpoint(base_dir, adapters: Sequence, out_dir, weights: Sequence[float] | None = None,
                     dtype: str | torch.dtype | None = None, force: bool = False, overwrite: bool = False) -> Path:
    """Write ``base_dir`` with ``adapters`` (paths, ``hf://`` refs or Adapter values; each times its weight) folded
    in to ``out_dir``. Refuses adapters made for another base unless ``force``, and a non-empty ``out_dir`` unless
    ``overwrite`` (and then only a folder adapterkit wrote)."""
    loaded = _load(adapters)
    weights = check_weights(weights, len(loaded))
    record = _read_record(base_dir)
    known = _recorded_base(record)
    for source, _, adapter in loaded:
        # A folder that already holds merged adapters is checked against the base they were merged into.
        if not known & set(adapter.manifest.base_model.recorded().values()):
            check_base(adapter, base_dir, source, force)
    if not known:
        values = fingerprints(base_dir)
        owner = pipeline.pipeline_of(base_dir)
        if owner is not None:  # a component folder: adapters made for its pipeline belong to it too
            values["pipeline"] = fingerprints(owner)["fp2"]
        record["base_fingerprint"], record["base_fingerprints"] = values["fp2"], values
    first = 1 + max((int(e["id"][1:]) for e in record["merged"] if str(e.get("id", "")).startswith("m")
                     and str(e["id"])[1:].isdigit()), default=0)
    entries = [{"id": f"m{first + i}", "source": source, "sha256": adapter.content_sha256(), "weight": weight,
                "base_fingerprint": adapter.manifest.base_model.fingerprint}
               for i, ((source, _, adapter), weight) in enumerate(zip(loaded, weights))]
    record["merged"] += entries
    return _rewrite(base_dir, loaded, weights, 1.0, out_dir, dtype, overwrite, record, [e["id"] for e in entries])


def unmerge_checkpoint(merged_dir, adapters: Sequence, out_dir, weights: Sequence[float] | None = None,
                       dtype: str | torch.dtype | None = None, force: bool = False, overwrite: bool = False) -> Path:
    """Write ``merged_dir`` with ``adapters`` (same weights as when merged) subtracted to ``out_dir``. Refuses an
    adapter that the folder's merge record does not list (with that weight) unless ``force``."""
    loaded = _load(adapters)
    weights = check_weights(weights, len(loaded))
    record = _read_record(merged_dir)
    ids = []
    for (source, _, adapter), weight in zip(loaded, weights):
        entry = next((e for e in record["merged"]
                      if e["sha256"] == adapter.content_sha256() and abs(e["weight"] - weight) < 1e-12), None)
        if entry is not None:
            record["merged"].remove(entry)
        elif not force:
            raise RequestError(f"{RECORD_FILE} does not list {source} merged with weight {weight}: "
                               "use --force to subtract it anyway", merged_dir)
        ids.append(None if entry is None else entry.get("id"))
    return _rewrite(merged_dir, loaded, weights, -1.0, out_dir, dtype, overwrite, record, ids)


def _load(adapters: Sequence) -> list[tuple[str, str | None, Adapter]]:
    """``(name for messages, local file or None, adapter)`` for each adapter given as a value, path or reference."""
    loaded = []
    for number_, given in enumerate(adapters, 1):
        if isinstance(given, Adapter):
            loaded.append((f"adapter {number_}", None, given))
        else:
            path = local_path(given)
            loaded.append((os.fspath(given), path, load_adapter(path)))
    return loaded


def _recorded_base(record: dict) -> set[str]:
    """The fingerprints of the base a merged folder's adapters were merged into (none for a plain base)."""
    values = dict(record.get("base_fingerprints") or {})
    if record.get("base_fingerprint"):
        values["recorded"] = record["base_fingerprint"]
    return {v for v in values.values() if isinstance(v, str)}


def _read_record(folder) -> dict:
    """The folder's merge record, checked (entries with a sha256 and a finite weight), or an empty one."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return {"merged": []}
    try:
        with open_regular(path) as handle:
            record = strict_json(handle.read(), RECORD_FILE)
        entries = record.get("merged") if isinstance(record, dict) else None
        if not isinstance(entries, list):
            raise ValueError
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise ValueError
            entry["weight"] = number(entry.get("weight"), "weight")
    except (ValueError, FormatError, RequestError):
        raise FormatError("not a valid merge record", path) from None
    return record


def _output_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return OUTPUT_DTYPES[dtype]
    except KeyError:
        raise RequestError(f"unknown dtype {dtype!r} (choose {', '.join(OUTPUT_DTYPES)})") from None


def _rewrite(source_dir, loaded, weights, sign, out_dir, dtype, overwrite, record, ids) -> Path:
    """``ids`` are the record entries of the adapters (new ones when merging, those taken out when unmerging)."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    dtype = _output_dtype(dtype)
    if not source_dir.is_dir():
        raise FileSystemError("the base must be a model folder (config.json and safetensors weights)", source_dir)
    inputs = [source_dir, *(path for _, path, _ in loaded if path is not None)]
    adapters = [a for _, _, a in loaded]
    stored = _read_kept(source_dir)  # {entry id: {key: tensor}}
    kept = {f"{index}/{key}": tensors for index, entry in enumerate(ids) if entry in stored
            for key, tensors in stored[entry].items()} if sign < 0 else {}
    if pipeline.is_pipeline(source_dir):
        names = pipeline.components(source_dir)
        _check_pipeline_targets(adapters, names, source_dir)
        with output(out_dir, inputs=inputs, folder=True, overwrite=overwrite, owned=[RECORD_FILE]) as temporary:
            plans = _rewrite_pipeline(source_dir, names, adapters, weights, sign, temporary, dtype, kept)
            _write_record(temporary, record, stored, ids, sign, plans)
        return out_dir
    name = pipeline.component_name(source_dir)
    owner = pipeline.pipeline_of(source_dir)
    names = (pipeline.components(owner) if owner is not None else pipeline.KNOWN_COMPONENTS) if name else ()
    with Checkpoint(source_dir) as checkpoint:
        plan = MergePlan(adapters, weights, checkpoint.names(), sign=sign, kept=kept, component=name,
                         components=names)
        if plan.elsewhere:
            others = ", ".join(f"{count} of {other}" for other, count in sorted(plan.elsewhere.items()))
            if plan.empty:
                raise RequestError(f"no target of the adapters is in {name} (they are in "
                                   f"{', '.join(sorted(plan.elsewhere))}): merge into that component's folder or the "
                                   "pipeline folder", source_dir)
            log.warning("%s is the %s component: the targets of other components are not merged here (%s); merge "
                        "into the pipeline folder to merge them too", source_dir, name, others)
        with output(out_dir, inputs=inputs, folder=True, overwrite=overwrite, owned=[RECORD_FILE]) as temporary:
            _write_shards(checkpoint, plan, temporary, dtype, sign)
            _copy_other_files(source_dir, temporary, dtype)
            _write_record(temporary, record, stored, ids, sign, [plan])
    return out_dir


def _write_record(folder: Path, record: dict, stored: dict, ids: Sequence[str], sign: float, plans) -> None:
    """The merge record, and the kept tensors of the entries it still lists: those carried over from the source
    folder and, when merging, what the new entries' inverse will need (from each plan), under their ids."""
    remaining = {e.get("id") for e in record["merged"]}
    carried = {entry: keys for entry, keys in stored.items() if entry in remaining}
    if sign > 0:
        for plan in plans:
            for key, tensors in plan.kept.items():
                index, _, rest = key.partition("/")
                carried.setdefault(ids[int(index)], {})[rest] = tensors
    _write_kept(folder / KEPT_FILE, carried)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def _read_kept(folder: Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """The kept tensors of a merged folder: ``{entry id: {"<component>.<target>.<parameter>": {name: tensor}}}``."""
    path = folder / KEPT_FILE
    if not path.is_file():
        return {}
    buffer = safetensors.map_file(path)
    header = safetensors.read_header(buffer)
    kept: dict = {}
    for name in header.entries:
        entry, _, rest = name.partition("/")
        key, _, tensor_name = rest.rpartition(".")
        value = safetensors.tensor(buffer, header, name).copy()
        kept.setdefault(entry, {}).setdefault(key, {})[tensor_name] = to_torch(value)
    return kept


def _write_kept(path: Path, kept: dict) -> None:
    tensors = {f"{entry}/{key}.{name}": value.detach().to(torch.float32).contiguous()
               for entry, keys in kept.items() for key, values in keys.items() for name, value in values.items()}
    if tensors:
        safetensors.write_file(path, tensors)


def _check_pipeline_targets(adapters, names: list[str], folder: Path) -> None:
    """Refuse, before writing, a target that names none of the pipeline's model folders."""
    for adapter in adapters:
        for component in adapter.components:
            for target in component.targets:
                if pipeline.split_target(target, names)[0] is None:
                    raise RequestError(f"component {component.name!r}: target {target!r} does not start with a "
                                       f"component of this pipeline ({', '.join(names)}), so it lands in none of its "
                                       "model folders", folder)


def _rewrite_pipeline(source_dir: Path, names: list[str], adapters, weights, sign, out: Path, dtype,
                      kept) -> list[MergePlan]:
    """Each component folder with its targets merged (or copied when none lands there and no dtype is asked for),
    every other file and folder copied; returns the components' plans."""
    plans = []
    for entry in sorted(source_dir.iterdir()):
        if entry.name in (RECORD_FILE, KEPT_FILE):
            continue
        if entry.is_dir() and entry.name in names:
            with Checkpoint(entry) as checkpoint:
                plan = MergePlan(adapters, weights, checkpoint.names(), sign=sign, kept=kept, component=entry.name,
                                 components=names)
                plans.append(plan)
                if plan.empty and dtype is None:
                    _copy_tree(entry, out / entry.name)
                    continue
                (out / entry.name).mkdir()
                _write_shards(checkpoint, plan, out / entry.name, dtype, sign)
                _copy_other_files(entry, out / entry.name, dtype)
        elif entry.is_dir():
            _copy_tree(entry, out / entry.name)
        elif entry.is_file():
            _copy_file(entry, out / entry.name)
    return plans


def _copy_tree(source: Path, target: Path) -> None:
    """A folder's regular files and folders, copied without their permission bits (the user's umask applies)."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_dir():
            _copy_tree(path, target / path.name)
        elif path.is_file():
            _copy_file(path, target / path.name)
        else:
            log.warning("%s is not a regular file or folder: not copied", path)


def _copy_file(source: Path, target: Path) -> None:
    with open_regular(source) as reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)


def _write_shards(checkpoint: Checkpoint, plan: MergePlan, out: Path, dtype: torch.dtype | None, sign: float) -> None:
    layout: dict[Path, list[tuple[str, str, list[int]]]] = {}
    for name in sorted(checkpoint.names()):
        entry = checkpoint.entry(name)
        written = TORCH_NAMES[dtype] if dtype is not None and entry.dtype in FLOAT_NAMES else entry.dtype
        layout.setdefault(checkpoint.shard_of[name], []).append((name, written, list(entry.shape)))
    last_shard = checkpoint.shards[-1]
    for name, tensor in sorted(plan.additions.items()):
        log.warning("%s is not in the base: added to %s", name, last_shard.name)
        written = dtype_name(tensor.dtype) if dtype is None else TORCH_NAMES[dtype]
        layout[last_shard].append((name, written, list(tensor.shape)))
    total = sum(math.prod(shape) * DTYPES[d].itemsize for entries in layout.values() for _, d, shape in entries)
    buffers = _WorkBuffers()
    with tqdm(total=total, unit="B", unit_scale=True, desc="merge" if sign > 0 else "unmerge", disable=None) as bar:
        for shard, entries in layout.items():
            with StreamedWriter(out / shard.name, entries, checkpoint.metadata(shard)) as writer:
                for name, written, shape in entries:
                    if name in checkpoint and not plan.touches(name) and written == checkpoint.entry(name).dtype:
                        writer.copy(name, shard, *checkpoint.file_offsets(name))  # unchanged: copied byte for byte
                    else:
                        tensor = to_torch(plan.additions[name] if name not in checkpoint else checkpoint.get(name))
                        buffer = buffers.next(shape) if plan.touches(name) else None
                        writer.write(name, plan.apply(name, tensor, TORCH_DTYPES[written], out=buffer))
                    bar.update(math.prod(shape) * DTYPES[written].itemsize)
    plan.check_done()
    if checkpoint.is_folder and checkpoint.index_name is not None:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: shard.name for shard, entries in layout.items() for name, _, _ in entries}}
        (out / checkpoint.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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
    """Config, tokenizer, generation config and the like; not weights, not the index or merge record we rewrite.
    Copied without their permission bits, so the output gets the user's umask."""
    for path in source_dir.iterdir():
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES) or path.name in (*INDEX_FILES, RECORD_FILE):
            continue
        _copy_file(path, out / path.name)
    config = out / "config.json"
    if dtype is not None and config.is_file():
        try:
            data = json.loads(config.read_bytes())
        except ValueError:  # not UTF-8 or not JSON
            data = None
        if not isinstance(data, dict):
            raise FormatError("is not a JSON object: cannot record the new dtype in it", source_dir / "config.json")
        if "_class_name" in data:  # a diffusers config: it has no dtype entry (from_pretrained takes torch_dtype)
            return
        data["dtype" if "torch_dtype" not in data else "torch_dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
