"""The base-model fingerprint (spec/SPEC.md §7): a short value that tells whether an adapter meets the base model it
was trained on, computed the same way from a model folder, a single or sharded checkpoint, or a module in memory.

Algorithm ``fp1``:
1. Take every floating-point tensor of the base with at least two dimensions (weight matrices and embeddings); for a
   module, its deduplicated parameters (tied weights count once), never its buffers. Leave out excluded tensors.
2. For each, a record: its shape as ``AxBxC``, a colon, and the sha256 (hex) of a content sample: the first and last
   slices along dimension 0 (``t[0]`` and ``t[-1]``), flattened, concatenated, converted to float32 and rounded to
   bfloat16 (round to nearest even), as little-endian 2-byte values.
3. Sort the records, join them with ``\\n``, and hash: ``"fp1:" + sha256(utf-8 text).hexdigest()``.

Names are left out on purpose: the same weights are named ``encoder.layer.0...`` in a ``BertModel`` checkpoint and
``bert.encoder.layer.0...`` inside ``BertForSequenceClassification``. Shapes and content still tell bases apart,
including two bases of one architecture. Rounding to bfloat16 makes a float32 or bfloat16 load of the same checkpoint
agree; loading in a lower precision than the checkpoint's (float16 from float32) can change the value.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterable, Iterator

import torch

from adapterkit.checkpoint import Checkpoint
from adapterkit.errors import AdapterError

log = logging.getLogger(__name__)

FLOATING = {"F16", "BF16", "F32", "F64"}


def fingerprint(base, exclude: Iterable[str] = ()) -> str:
    """Fingerprint of ``base``: a model folder or safetensors file path, or a ``torch.nn.Module``.

    ``exclude`` names modules or tensors to leave out (a tensor is out when its name equals an entry or starts with
    an entry followed by a dot), for example the task head an adapter brings with it.
    """
    excluded = tuple(exclude)
    records = sorted(_record(shape, first, last) for shape, first, last in _samples(base, excluded))
    return "fp1:" + hashlib.sha256("\n".join(records).encode()).hexdigest()


def _is_excluded(name: str, excluded: tuple[str, ...]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in excluded)


def _samples(base, excluded) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    if isinstance(base, torch.nn.Module):
        for name, parameter in base.named_parameters():
            if parameter.is_floating_point() and parameter.ndim >= 2 and not _is_excluded(name, excluded):
                yield list(parameter.shape), parameter.detach()[0], parameter.detach()[-1]
        return
    with Checkpoint(os.fspath(base)) as checkpoint:
        for name in checkpoint.names():
            if _is_excluded(name, excluded):
                continue
            view = checkpoint.slice(name)
            shape = list(view.get_shape())
            if view.get_dtype() in FLOATING and len(shape) >= 2:
                yield shape, view[0:1][0], view[shape[0] - 1 : shape[0]][0]


def _record(shape: list[int], first: torch.Tensor, last: torch.Tensor) -> str:
    sample = torch.cat([first.reshape(-1), last.reshape(-1)]).to(torch.float32).to(torch.bfloat16)
    digest = hashlib.sha256(sample.view(torch.int16).numpy().astype("<i2").tobytes()).hexdigest()
    return f"{'x'.join(map(str, shape))}:{digest}"


def full_targets(adapter) -> list[str]:
    """Targets whose tensors an adapter's ``full`` components bring whole (a task head): not part of its base."""
    return [t for c in adapter.components if c.kind == "full" for t in c.targets]


def check_base(adapter, base, where: str, force: bool = False, replaced: Iterable[str] | None = None,
               also_exclude: Iterable[str] = ()) -> None:
    """Refuse ``adapter`` on ``base`` (a module or checkpoint path) when its recorded base fingerprint differs, unless
    ``force``. ``replaced`` names the base tensors its full components replace (default: their targets as written);
    they are left out, and a fingerprint that includes them is accepted too. ``also_exclude`` names tensors that are
    not the base's own (adapters attached earlier)."""
    expected = adapter.manifest.base_model.fingerprint
    if expected is None:
        log.warning("%s records no base fingerprint: cannot check that it belongs to this base", where)
        return
    replaced = list(full_targets(adapter) if replaced is None else replaced)
    also_exclude = list(also_exclude)
    actual = fingerprint(base, exclude=replaced + also_exclude)
    if actual == expected or (replaced and expected == fingerprint(base, exclude=also_exclude)):
        return
    if force:
        log.warning("%s was made for base %s but this base is %s; going on anyway (force)", where, expected, actual)
        return
    raise AdapterError(f"{where} was made for another base model (fingerprint {expected}, this base is {actual}); "
                       "pass --force (force=True) to use it anyway")
