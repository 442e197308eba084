"""The base-model fingerprint (spec/SPEC.md §7): a short value that tells whether an adapter meets the base model it
was trained on, computed the same way from a model folder, a single or sharded checkpoint, or a module in memory.

Algorithm ``fp2`` (written since format 1.1; ``fp1`` is still checked):
1. Take every floating-point tensor of the base with at least two dimensions (weight matrices and embeddings); for a
   module, its deduplicated parameters (tied weights count once), never its buffers nor the parameters of attached
   adapters. Leave out excluded tensors, and (``fp2``) the tensors of task heads and poolers: those with a name
   segment in :data:`HEAD_SEGMENTS`, which a head class adds or drops (RoBERTa's classifier model drops the
   checkpoint's pooler), so that the fingerprint does not depend on which class loads the checkpoint.
2. For each, a record: its shape as ``AxBxC``, a colon, and the sha256 (hex) of a content sample: the first and last
   slices along dimension 0 (``t[0]`` and ``t[-1]``), flattened, concatenated, converted to float32 and rounded to
   bfloat16 (round to nearest even), as little-endian 2-byte values.
3. Sort the records, join them with ``\\n``, and hash: ``"fp2:" + sha256(utf-8 text).hexdigest()``.

Names are left out on purpose: the same weights are named ``encoder.layer.0...`` in a ``BertModel`` checkpoint and
``bert.encoder.layer.0...`` inside ``BertForSequenceClassification``. Shapes and content still tell bases apart,
including two bases of one architecture. Rounding to bfloat16 makes a float32 or bfloat16 load of the same checkpoint
agree; loading in a lower precision than the checkpoint's (float16 from float32) can change the value.

A folder or file is fingerprinted with numpy alone; a module needs torch (it is one). A diffusers pipeline folder's
fingerprint is that of its denoiser (``unet/`` or ``transformer/``, :mod:`adapterkit.io.pipeline`); an adapter is
accepted on a component folder of a pipeline when it was made for the pipeline, and on a pipeline when it was made
for one of its components.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from adapterkit.arrays import FLOAT_NAMES, as_array
from adapterkit.errors import BaseMismatchError, RequestError
from adapterkit.io import pipeline
from adapterkit.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)

#: name segments of task heads and poolers, left out by fp2 (spec §7)
HEAD_SEGMENTS = frozenset({"pooler", "cls", "lm_head", "embed_out", "classifier", "pre_classifier", "score",
                           "qa_outputs", "vocab_transform", "vocab_projector", "vocab_layer_norm"})
ALGORITHMS = ("fp1", "fp2")
CURRENT = "fp2"


def fingerprint(base, exclude: Iterable[str] = (), algorithm: str = CURRENT) -> str:
    """Fingerprint of ``base``: a model folder or safetensors file path, or a ``torch.nn.Module``.

    ``exclude`` names modules or tensors to leave out (a tensor is out when its name equals an entry or starts with
    an entry followed by a dot), for example the task head an adapter brings with it. ``algorithm`` is ``fp2`` or
    ``fp1``.
    """
    return fingerprints(base, exclude)[algorithm]


def fingerprints(base, exclude: Iterable[str] = ()) -> dict[str, str]:
    """Every algorithm's fingerprint of ``base``, from one pass over its tensors."""
    excluded = tuple(exclude)
    records = [(_is_head(name), _record(shape, first, last)) for name, shape, first, last in _samples(base, excluded)]
    chosen = {"fp1": [r for _, r in records], "fp2": [r for head, r in records if not head]}
    return {name: f"{name}:" + hashlib.sha256("\n".join(sorted(values)).encode()).hexdigest()
            for name, values in chosen.items()}


def record_base(base_model, base, exclude: Iterable[str] = ()) -> None:
    """Fill ``base_model`` (a manifest's BaseModel) with the fingerprints of ``base``: ``fp1`` in ``fingerprint``,
    which 1.0 readers check, and ``fp2`` in ``fingerprints``."""
    values = fingerprints(base, exclude)
    base_model.fingerprint = values["fp1"]
    base_model.fingerprints = {"fp2": values["fp2"]}


def _is_head(name: str) -> bool:
    return not HEAD_SEGMENTS.isdisjoint(name.split(".")[:-1])


def _is_excluded(name: str, excluded: tuple[str, ...]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in excluded)


def _samples(base, excluded) -> Iterator[tuple[str, list[int], np.ndarray, np.ndarray]]:
    if isinstance(base, (str, os.PathLike)) and pipeline.is_pipeline(base):
        base = pipeline.denoiser(base)
    if not isinstance(base, (str, os.PathLike)):  # a torch module
        from adapterkit.attach import is_adapter_parameter
        from adapterkit.precision import is_quantized

        for name, parameter in base.named_parameters():
            if (parameter.is_floating_point() and parameter.ndim >= 2 and not _is_excluded(name, excluded)
                    and not is_adapter_parameter(parameter)):
                if is_quantized(parameter):
                    raise RequestError(f"{name} is held quantized: a quantized model no longer gives its weights "
                                       "back, so it has no fingerprint; fingerprint the checkpoint it was loaded "
                                       "from instead (attach(..., reference=folder))")
                yield name, list(parameter.shape), as_array(parameter[0]), as_array(parameter[-1])
        return
    with Checkpoint(os.fspath(base)) as checkpoint:
        for name in checkpoint.names():
            if _is_excluded(name, excluded):
                continue
            entry = checkpoint.entry(name)
            if entry.dtype in FLOAT_NAMES and len(entry.shape) >= 2 and entry.shape[0] > 0:
                tensor = checkpoint.get(name)
                yield name, list(entry.shape), tensor[0], tensor[-1]


def _record(shape: list[int], first: np.ndarray, last: np.ndarray) -> str:
    sample = np.concatenate([first.reshape(-1), last.reshape(-1)]).astype(np.float32).astype(ml_dtypes.bfloat16)
    digest = hashlib.sha256(sample.view("<i2").tobytes()).hexdigest()
    return f"{'x'.join(map(str, shape))}:{digest}"


def replaced_targets(adapter) -> list[str]:
    """Targets whose tensors an adapter brings whole (a task head): not part of the base it belongs to."""
    from adapterkit.kinds import get_kind

    return [t for c in adapter.components for t in get_kind(c.kind).replaced_targets(c)]


def _related(base) -> Iterator:
    """The bases an adapter made for ``base``'s pipeline or components also belongs to: for a component folder of a
    pipeline, the pipeline; for a pipeline, each component folder."""
    if not isinstance(base, (str, os.PathLike)):
        return
    if pipeline.is_pipeline(base):
        yield from (os.path.join(base, name) for name in pipeline.components(base))
    elif (owner := pipeline.pipeline_of(base)) is not None:
        yield owner


def check_base(adapter, base, where: str, force: bool = False, replaced: Iterable[str] | None = None) -> None:
    """Refuse ``adapter`` on ``base`` (a module or checkpoint path) when its recorded base fingerprint differs, unless
    ``force``. ``replaced`` names the base tensors its components replace whole (default: their targets as
    written); they are left out, and a fingerprint that includes them is accepted too."""
    recorded = adapter.manifest.base_model.recorded()
    if not recorded:
        log.warning("%s records no base fingerprint: cannot check that it belongs to this base", where)
        return
    algorithm = CURRENT if CURRENT in recorded else next((a for a in ALGORITHMS if a in recorded), None)
    if algorithm is None:  # only algorithms from a newer adapterkit: this one cannot check them
        if force:
            log.warning("%s records only fingerprints this adapterkit does not know; going on anyway (force)", where)
            return
        raise BaseMismatchError(f"{where} records only fingerprints of algorithms this adapterkit does not know "
                                f"({', '.join(recorded)}): it cannot check the base; pass --force (force=True) to go on")
    expected = recorded[algorithm]
    replaced = list(replaced_targets(adapter) if replaced is None else replaced)
    try:
        actual = fingerprint(base, exclude=replaced, algorithm=algorithm)
    except RequestError as exc:  # a model held quantized gives no fingerprint back
        if force and not isinstance(base, (str, os.PathLike)):
            log.warning("%s: cannot check the base (%s); going on anyway (force)", where, exc)
            return
        raise
    if actual == expected or (replaced and expected == fingerprint(base, algorithm=algorithm)):
        return
    if any(fingerprint(other, exclude=replaced, algorithm=algorithm) == expected for other in _related(base)):
        return
    if force:
        log.warning("%s was made for base %s but this base is %s; going on anyway (force)", where, expected, actual)
        return
    raise BaseMismatchError(f"{where} was made for another base model (fingerprint {expected}, this base is "
                            f"{actual}); pass --force (force=True) to use it anyway")
