"""Export a Hugging Face base model with adapters to ONNX: merged (adapters folded into the weights) or unmerged
(one graph whose adapter slots are optional inputs, plus one ``.onnx_adapter`` file per adapter to switch between).

The output folder holds ``model.onnx``, ``adapters/<name>.onnx_adapter`` (unmerged) and ``adapterkit.json``, which
says what the graph takes and returns and which adapters exist. :class:`adapterkit.onnx.runner.Runner` reads it.
With ``bank=True`` (unmerged) the graph takes an adapter bank and each row's entry in it (:mod:`adapterkit.onnx.bank`),
so one run serves rows with different adapters; ``bank_empty.onnx_adapter`` holds every slot with no adapter.
With ``cache=True`` (causal LMs) the graph is one generation step with its key/value cache in and out
(:class:`~adapterkit.onnx.exportable.CachedExportableModel`), and ``adapterkit.json`` describes the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch
import transformers
from torch.export import Dim
from tqdm.auto import tqdm

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError, FormatError, RequestError
from adapterkit.fingerprints import check_base
from adapterkit.io import outputs
from adapterkit.kinds import get_kind
from adapterkit.merge import merge_into_model
from adapterkit.kinds.runtime import BANK_LENGTH
from adapterkit.onnx.adapter_files import write_onnx_adapter
from adapterkit.onnx.bank import INDEX_INPUT, length_slots
from adapterkit.onnx.exportable import (CachedExportableModel, ExportableModel, bank_defaults, output_name,
                                        slot_defaults)
from adapterkit.onnx.graph import add_defaults, io_description
from adapterkit.onnx.slots import adapter_feeds, check_slots, split_slot
from adapterkit.values import check_weights

log = logging.getLogger(__name__)

DESCRIPTION = "adapterkit.json"
MODEL_FILE = "model.onnx"
TEXT_INPUTS = ("input_ids", "attention_mask")
#: example sizes for the dynamic dims while tracing (≥ 2, and distinct, so the exporter keeps them symbolic)
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_SLOT, EXAMPLE_PAST, EXAMPLE_BANK = 2, 7, 3, 5, 4
BANK_EMPTY = "bank_empty.onnx_adapter"


@dataclasses.dataclass
class Exported:
    """What :func:`export_onnx` wrote, and the torch module it traced (for verification)."""

    folder: Path
    merged: bool
    torch_model: ExportableModel
    description: dict
    #: adapter name -> (adapter, weight), as exported
    adapters: dict[str, tuple[Adapter, float]]


def load_base(folder: str | os.PathLike) -> torch.nn.Module:
    """The model class named by the folder's ``config.json`` (``architectures``), loaded in float32, eval mode, with
    sdpa attention where the family has it, else eager (Gemma2's soft-capping has no sdpa). Encoder-decoder models
    are refused: the export has one token stream in and one tensor out."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise FormatError(f"not a Hugging Face model folder ({exc})", folder) from None
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise FormatError(f"config.json names architecture {architecture!r}, which transformers does not know", folder)
    if getattr(config, "is_encoder_decoder", False):
        raise RequestError(f"{architecture} is an encoder-decoder model: the ONNX export supports decoder-only and "
                           "encoder-only models", folder)
    attention = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    model = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
    return model.eval()


def adapter_names(refs: Sequence[str]) -> list[str]:
    """Names for adapters given as paths: the file stems, made unique."""
    names: list[str] = []
    for ref in refs:
        stem = Path(str(ref).rstrip("/")).name.split(".")[0] or "adapter"
        name, number = stem, 2
        while name in names:
            name, number = f"{stem}_{number}", number + 1
        names.append(name)
    return names


def export_onnx(base: str | os.PathLike, adapters: Sequence[Adapter], output: str | os.PathLike, *, merged: bool,
                names: Sequence[str] | None = None, weights: Sequence[float] | None = None, opset: int | None = None,
                force: bool = False, overwrite: bool = False, inputs: Sequence = (), cache: bool = False,
                bank: bool = False) -> Exported:
    """Export ``base`` (a Hugging Face folder) with ``adapters`` to the folder ``output``; see the module docstring.
    ``inputs`` names the adapters' files (the output may not overlap them, nor the base); ``cache``: a generation
    step with the key/value cache in and out (causal LMs); ``bank``: rows with adapters of their own."""
    names = list(names or [f"adapter_{i}" for i in range(len(adapters))])
    weights = check_weights(weights, len(adapters))
    if len(names) != len(adapters):
        raise RequestError(f"{len(adapters)} adapters but {len(names)} names")
    if bank and merged:
        raise RequestError("an adapter bank is unmerged: the adapters stay graph inputs")
    with outputs.output(output, inputs=[base, *inputs], folder=True, overwrite=overwrite,
                        owned=[DESCRIPTION]) as staging:
        model = load_base(base)
        if cache and not model.can_generate():
            raise RequestError(f"{type(model).__name__} does not generate text: a key/value cache graph is for causal "
                               "LMs", base)
        exportable = CachedExportableModel if cache else ExportableModel
        for name, adapter in zip(names, adapters):
            check_base(adapter, model, f"adapter {name!r}", force)
        feeds: dict[str, dict[str, torch.Tensor]] = {}
        if merged:
            merge_into_model(model, adapters, weights, force=True)  # the base was checked above
            torch_model = exportable(model, {})
        else:
            feeds = {name: adapter_feeds(adapter, weight, model)
                     for name, adapter, weight in zip(names, adapters, weights)}
            examples = {slot: tensor for adapter_feed in feeds.values() for slot, tensor in adapter_feed.items()}
            check_slots(examples)
            empty = slot_defaults(model, examples)
            torch_model = exportable(model, bank_defaults(empty), bank=True) if bank else exportable(model, empty)
        with tqdm(total=2 + len(adapters), desc="export", unit="step", disable=None) as progress:
            progress.set_postfix_str("tracing")
            onnx_model = _trace(torch_model, model, opset)
            _check_dynamic(onnx_model, base)
            progress.update()
            add_defaults(onnx_model, torch_model.defaults)
            onnx.save(onnx_model, staging / MODEL_FILE)
            if bank:
                write_onnx_adapter(empty, staging / BANK_EMPTY)
            progress.update()
            described = []
            for name, adapter in zip(names, adapters):
                entry = {"name": name, "kinds": adapter.manifest.kinds}
                if not merged:
                    entry["file"] = f"adapters/{name}.onnx_adapter"
                    (staging / "adapters").mkdir(exist_ok=True)
                    write_onnx_adapter(feeds[name], staging / entry["file"])
                described.append(entry)
                progress.update()
        description = {
            "format": "adapterkit-onnx",
            "version": 1,
            "mode": "merged" if merged else "unmerged",
            "model": MODEL_FILE,
            "base": os.path.abspath(base),
            "inputs": io_description(onnx_model, _input_names(torch_model)
                                     + ([INDEX_INPUT] if bank else [])),
            "adapter_inputs": io_description(onnx_model, torch_model.slot_names),
            "outputs": io_description(onnx_model, _output_names(torch_model, model)),
            "adapters": described,
            "weights": weights,
        }
        if bank:
            description["bank"] = {
                "index": INDEX_INPUT, "empty": BANK_EMPTY, "lengths": length_slots(list(empty)),
                "axes": {slot: get_kind(split_slot(slot)[1]).runtime.dynamic_axes[split_slot(slot)[2]] for slot in empty
                         if split_slot(slot)[2] in get_kind(split_slot(slot)[1]).runtime.dynamic_axes}}
        if cache:
            description["cache"] = {"layers": torch_model.layers, "kv_heads": torch_model.kv_heads,
                                    "head_dim": torch_model.head_dim}
            config = model.config  # what generating needs to know of the model (adapterkit serve)
            description["generation"] = {
                "vocab_size": config.vocab_size,
                "max_positions": getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                                             None),
                "eos_token_id": getattr(model.generation_config, "eos_token_id", None)}
        (staging / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    log.info("exported %s (%s, %d adapters)", output, description["mode"], len(adapters))
    return Exported(Path(output), merged, torch_model, description, dict(zip(names, zip(adapters, weights))))


def _cache_names(torch_model: ExportableModel, prefix: str) -> list[str]:
    """``<prefix>.<layer>.key`` and ``.value`` of each layer of a cached graph (none for a plain one)."""
    layers = getattr(torch_model, "layers", 0)
    return [f"{prefix}.{layer}.{part}" for layer in range(layers) for part in ("key", "value")]


def _input_names(torch_model: ExportableModel) -> list[str]:
    if isinstance(torch_model, CachedExportableModel):
        return [*TEXT_INPUTS, "position_ids", *_cache_names(torch_model, "past_key_values")]
    return list(TEXT_INPUTS)


def _output_names(torch_model: ExportableModel, model: torch.nn.Module) -> list[str]:
    return [output_name(model), *_cache_names(torch_model, "present")]


def _check_dynamic(onnx_model: onnx.ModelProto, base) -> None:
    """Refuse a graph whose batch or sequence length the exporter fixed to the example's (it may specialise a dim
    instead of failing): it would run only at those sizes."""
    for described in io_description(onnx_model, TEXT_INPUTS):
        if any(isinstance(dim, int) for dim in described["shape"]):
            raise RequestError(f"the exported graph fixed the shape of {described['name']} to {described['shape']}; "
                               "this model cannot be exported with dynamic batch and sequence (please report it)",
                               base)


def _trace(torch_model: ExportableModel, model: torch.nn.Module, opset: int | None) -> onnx.ModelProto:
    """torch.export (dynamo) the module with dynamic batch, sequence and slot dims; the ONNX model in memory."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE), generator=generator)
    attention_mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_SEQUENCE, dtype=torch.long)
    batch, sequence = Dim("batch"), Dim("sequence")
    slot_examples, slot_shapes, slot_dims = [], [], {}
    if torch_model.bank:  # each row's entry, then the bank: one more leading dim, the entries
        entries = Dim("bank")
        slot_examples.append(torch.arange(EXAMPLE_BATCH) % EXAMPLE_BANK)
        slot_shapes.append({0: batch})
    for number, name in enumerate(torch_model.slot_names):
        default = torch_model.defaults[name]
        module, kind, role = split_slot(name)
        leading = int(torch_model.bank)
        if role == BANK_LENGTH and torch_model.bank:
            slot_examples.append(torch.randint(0, EXAMPLE_SLOT + 1, (EXAMPLE_BANK,), generator=generator))
            slot_shapes.append({0: entries})
            continue
        axis = get_kind(kind).runtime.dynamic_axes.get(role)
        shape = list(default.shape)
        if torch_model.bank:
            shape[0] = EXAMPLE_BANK
        if axis is None:
            slot_examples.append(default.expand(shape).clone())
            slot_shapes.append({0: entries} if leading else {})  # every dim static ({}, not None: pytrees drop it)
            continue
        # the roles of one (module, kind) share their dim: LoRA's A and B their rank, a prefix's keys and values p
        dim = slot_dims.setdefault((module, kind), Dim(f"{kind}_{number}"))
        shape[leading + axis] = EXAMPLE_SLOT
        slot_examples.append(torch.randn(shape, generator=generator) * 0.01)
        slot_shapes.append({leading + axis: dim, **({0: entries} if leading else {})})
    dynamic_shapes = ({0: batch, 1: sequence}, {0: batch, 1: sequence})
    text_examples = (input_ids, attention_mask)
    if isinstance(torch_model, CachedExportableModel):  # the mask covers past and new tokens: a dim of its own
        past_length = Dim("past_sequence")
        attention_mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_PAST + EXAMPLE_SEQUENCE, dtype=torch.long)
        positions = torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + EXAMPLE_SEQUENCE).expand(EXAMPLE_BATCH, -1)
        past = tuple(torch.randn(EXAMPLE_BATCH, torch_model.kv_heads, EXAMPLE_PAST, torch_model.head_dim,
                                 generator=generator) for _ in range(2 * torch_model.layers))
        text_examples = (input_ids, attention_mask, positions, past)
        dynamic_shapes = ({0: batch, 1: sequence}, {0: batch, 1: Dim("total_sequence")}, {0: batch, 1: sequence},
                          tuple({0: batch, 2: past_length} for _ in past))
    if slot_shapes:
        dynamic_shapes += (tuple(slot_shapes),)  # torch.export sees forward's *slots as one tuple argument
    with warnings.catch_warnings():
        # A and B of one module share one Dim on purpose; the exporter warns that the second use adds no name
        warnings.filterwarnings("ignore", message="# The axis name")
        program = _reporting_our_errors(
            torch.onnx.export,
            torch_model, (*text_examples, *slot_examples), dynamo=True, opset_version=opset,
            input_names=[*_input_names(torch_model), *([INDEX_INPUT] if torch_model.bank else []),
                         *torch_model.slot_names],
            output_names=_output_names(torch_model, model),
            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
    return program.model_proto


def _reporting_our_errors(export, *args, **kwargs):
    """``export(*args, **kwargs)``, where an adapterkit error raised inside the traced forward (an adapter the
    model cannot run that way) comes out as itself, not wrapped in the exporter's report."""
    try:
        return export(*args, **kwargs)
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, AdapterError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
