"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) to adapterkit and back.

PEFT's names are those of ``PeftModel.save_pretrained``: every key starts ``base_model.model.`` (a prefix's
``prompt_embeddings`` excepted). What each kind's tensors and config are in PEFT lives in the kind's package
(``adapterkit/kinds/<kind>/peft.py``): a kind that is a PEFT method declares its ``PEFT_TYPE`` (``lora``: LORA,
``prefix``: PREFIX_TUNING); a kind PEFT only carries inside another method's files declares ``RIDES_ON`` (BitFit's
trained biases and ``full``'s ``modules_to_save`` ride on LORA). This module reads and writes the folder and lets
each kind take its part; a key no kind claims is refused.

``adapter_model.bin`` (pickle) is never read. Component weights are folded into what is written (B·w, Δb·w).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from adapterkit.adapter import Adapter, tensor_name
from adapterkit.errors import AdapterError, FormatError, RequestError
from adapterkit.fingerprints import record_base, replaced_targets
from adapterkit.io import safetensors
from adapterkit.io.outputs import output
from adapterkit.io.paths import open_regular
from adapterkit.kinds import KINDS
from adapterkit.manifest import BaseModel, Manifest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
UNPREFIXED = ("prompt_embeddings",)


def detect(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def _methods() -> list:
    """The peft mappings of the kinds that are a PEFT method, in registry order."""
    return [m for m in (kind.peft for kind in KINDS.values()) if m is not None and hasattr(m, "PEFT_TYPE")]


def _method_for(config: dict):
    """The mapping that reads a config: its PEFT type, and the kind's own test where one PEFT type holds several
    kinds (``LORA`` with ``use_dora`` is DoRA)."""
    for method in _methods():
        if method.PEFT_TYPE == config.get("peft_type") and getattr(method, "claims", lambda c: True)(config):
            return method
    return None


def _riders(peft_type: str) -> list[tuple[str, object]]:
    """``(kind name, peft mapping)`` of the kinds PEFT carries inside ``peft_type``'s files, in reading order."""
    riders = [(name, kind.peft) for name, kind in KINDS.items()
              if kind.peft is not None and peft_type in getattr(kind.peft, "RIDES_ON", ())]
    return sorted(riders, key=lambda rider: not getattr(rider[1], "CLAIMS_FIRST", False))


# ---------------------------------------------------------------- reading


def read(path, base=None) -> Adapter:
    """A PEFT adapter folder as an Adapter. ``base`` (the base model folder) is needed for biases and prefixes,
    and fills the base fingerprint."""
    folder = Path(path)
    config = _read_config(folder)
    tensors = _read_weights(folder)
    try:
        method = _method_for(config)
        if method is None:
            raise FormatError(f"PEFT type {config.get('peft_type')!r} is not supported "
                              f"({', '.join(sorted({m.PEFT_TYPE for m in _methods()}))} are)")
        context = {"base": base}
        found = method.read(config, tensors, context)
        for _, rider in _riders(method.PEFT_TYPE):
            found += rider.read(config, tensors, context)
        if tensors:
            raise FormatError(f"tensor {_prefixed(sorted(tensors)[0])!r} belongs to no kind adapterkit reads here")
        if not found:
            raise FormatError(f"{WEIGHTS_FILE} holds no tensors")
    except AdapterError as exc:
        raise exc.at(folder) from None
    components = [component for component, _ in found]
    adapter = Adapter(Manifest(components, BaseModel(_text(config.get("base_model_name_or_path")),
                                                     _text(config.get("revision")))),
                      {tensor_name(c.name, t, role): x for c, held in found for t, roles in held.items()
                       for role, x in roles.items()})
    if base is not None:
        record_base(adapter.manifest.base_model, base, exclude=replaced_targets(adapter))
    try:
        adapter.validate()
    except AdapterError as exc:
        raise exc.at(folder) from None
    return adapter


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _prefixed(key: str) -> str:
    return key if key in UNPREFIXED else KEY_PREFIX + key


def _read_config(folder: Path) -> dict:
    try:
        with open_regular(folder / CONFIG_FILE) as handle:
            config = safetensors.strict_json(handle.read(), CONFIG_FILE)
    except FormatError as exc:
        raise exc.at(folder) from None
    if not isinstance(config, dict):
        raise FormatError(f"{CONFIG_FILE} is not a JSON object", folder)
    return config


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / PICKLED_WEIGHTS_FILE).is_file():
            raise FormatError(f"only {PICKLED_WEIGHTS_FILE} is present: it is a pickle, which adapterkit never loads "
                              "(re-save the adapter with safe_serialization=True)", folder)
        raise FormatError(f"no {WEIGHTS_FILE}", folder)
    _, tensors = safetensors.read_tensors(weights)
    strange = [k for k in tensors if not k.startswith(KEY_PREFIX) and k not in UNPREFIXED]
    if strange:
        raise FormatError(f"tensor {strange[0]!r} does not start with {KEY_PREFIX!r}", weights)
    return {k.removeprefix(KEY_PREFIX): v for k, v in tensors.items()}


# ---------------------------------------------------------------- writing


def write(adapter: Adapter, path, base=None, inputs=(), overwrite: bool = False) -> None:
    """Write ``adapter`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads unchanged (through the
    output discipline: never over an input, replaced whole or not at all). An existing folder is replaced only with
    ``overwrite``, and only when it holds nothing but a PEFT adapter's files."""
    by_kind: dict[str, list] = {}
    for component in adapter.components:
        by_kind.setdefault(component.kind, []).append(component)
    if any(len(components) > 1 for components in by_kind.values()):
        raise RequestError("PEFT holds one component of each kind: compose the adapter's components first", path)
    methods = {name: KINDS[name].peft for name in by_kind if hasattr(KINDS[name].peft, "PEFT_TYPE")}
    if len(methods) > 1:
        raise RequestError(f"PEFT cannot hold {' and '.join(methods)} in one adapter", path)
    if not methods:  # BitFit, a head: PEFT carries them only inside a method's files, which need a target
        riders = ", ".join(by_kind)
        raise RequestError(f"PEFT carries {riders} only inside a method's adapter (LoRA's bias= and "
                           "modules_to_save): compose it with a LoRA first, or keep the adapterkit file", path)
    method = next(iter(methods.values()))
    for name in by_kind:
        kind = KINDS[name]
        if kind.peft is None or (kind.peft is not method and method.PEFT_TYPE not in getattr(kind.peft, "RIDES_ON", ())):
            raise RequestError(f"PEFT has no equivalent for a {name} component"
                               + (f" beside {method.PEFT_TYPE}" if kind.peft is not None else ""), path)
    config = method.empty_config() if hasattr(method, "empty_config") else {}
    context = {"base": base}
    tensors: dict[str, np.ndarray] = {}
    ordered = sorted(by_kind, key=lambda name: KINDS[name].peft is not method)  # the method first, then the riders
    for name in ordered:
        component = by_kind[name][0]
        tensors.update(KINDS[name].peft.write(component, adapter.component_tensors(component.name), config, context))
    config.update(base_model_name_or_path=adapter.manifest.base_model.id,
                  revision=adapter.manifest.base_model.revision, inference_mode=True)
    keyed = {_prefixed(k): np.ascontiguousarray(v) for k, v in tensors.items()}
    with output(path, inputs=[*inputs, *([base] if base else [])], folder=True, overwrite=overwrite,
                owned=[CONFIG_FILE], only=[CONFIG_FILE, WEIGHTS_FILE, "README.md"]) as folder:
        safetensors.write_file(folder / WEIGHTS_FILE, keyed, metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
