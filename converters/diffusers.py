"""diffusers LoRA files (``pipeline.save_lora_weights``, ``pytorch_lora_weights.safetensors``) to adapterkit and back.

Two layouts are read; one is written:

- PEFT-style (diffusers ≥ 0.24, written): ``<component>.<module>.lora_A.weight`` [r, in] (a Conv2d's [r, in, kh, kw])
  and ``.lora_B.weight`` [out, r] ([out, r, 1, 1]), DoRA's ``.lora_magnitude_vector`` [out]; the component is
  ``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``. The LoRA config of each component (PEFT's
  ``LoraConfig``: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``) is JSON in
  the safetensors metadata key ``lora_adapter_metadata``, each field prefixed with the component (``unet.r``).
  Without it, diffusers takes α = r (scale 1), and so does this reader.
- the older layout of attention processors: ``…attn1.processor.to_q_lora.down.weight`` / ``.up.weight`` (``to_q``,
  ``to_k``, ``to_v``, ``to_out.0`` in a UNet; ``q_proj`` … ``out_proj`` in a text encoder), ``….lora.down.weight``
  and ``….lora_linear_layer.down.weight`` for other modules, and per-module ``….alpha`` scalars ("network alphas",
  diffusers' conversion of kohya files keeps them so: the scale is α/r).

Targets are the component's name and the module path (``unet.down_blocks.0.resnets.0.conv1``, see
:mod:`adapterkit.io.pipeline`). Module names are diffusers' own, so ``--base`` (a pipeline folder or a model folder)
is optional: given, every module is checked against it and the base's fingerprint recorded. ``.bin`` files (pickles)
are never read.

Written output: a ``.safetensors`` path is one file; any other path a folder holding
``pytorch_lora_weights.safetensors`` (what ``pipeline.load_lora_weights(folder)`` looks for). Component weights are
folded into B, rsLoRA written as α·√r (one scale rule per file), and each component's LoRA config is written in
``lora_adapter_metadata``, so diffusers rebuilds the same α and ranks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from adapterkit.adapter import Adapter
from adapterkit.converters import sd_base
from adapterkit.errors import AdapterError, FormatError, RequestError
from adapterkit.io import safetensors
from adapterkit.io.outputs import output
from adapterkit.io.pipeline import KNOWN_COMPONENTS, split_target
from adapterkit.kinds.lora.peft import _pattern_value

log = logging.getLogger(__name__)

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
PICKLED_WEIGHTS_FILE = "pytorch_lora_weights.bin"
METADATA_KEY = "lora_adapter_metadata"
#: PEFT-style suffixes -> role
SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude",
            ".lora_magnitude_vector.weight": "magnitude", ".alpha": "alpha"}
OLD_ATTENTION = re.compile(r"^(?P<module>.+)\.to_(?P<projection>q|k|v|out)_lora\.(?P<role>down|up)\.weight$")
OLD_OTHER = re.compile(r"^(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight$")
#: the old attention processors' projections, by component family: a denoiser's, a text encoder's
PROJECTIONS = {False: {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
               True: {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}
#: LoraConfig options a diffusers file may set that no adapterkit kind expresses
UNSUPPORTED_OPTIONS = ("lora_bias", "use_qalora", "layer_replication", "use_bdlora", "target_parameters")
KEY = re.compile(r"^(?:" + "|".join(KNOWN_COMPONENTS) + r")\..+\.(?:lora_A\.weight|lora_B\.weight"
                 r"|lora_magnitude_vector|to_(?:q|k|v|out)_lora\.(?:down|up)\.weight|lora\.(?:down|up)\.weight"
                 r"|lora_linear_layer\.(?:down|up)\.weight)$")


def claims(keys, metadata) -> bool:
    """Whether tensor names (and metadata) are a diffusers LoRA's."""
    return (isinstance(metadata, dict) and METADATA_KEY in metadata) or any(KEY.match(k) for k in keys)


def _weights(path) -> Path:
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def detect(path) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / WEIGHTS_FILE).is_file() or (path / PICKLED_WEIGHTS_FILE).is_file()
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    try:
        header = safetensors.read_header(safetensors.map_file(path), allow_empty=True)
    except AdapterError:
        return False
    return claims(header.entries, header.metadata)


# ---------------------------------------------------------------- reading


def read(path, base=None) -> Adapter:
    """A diffusers LoRA (a ``pytorch_lora_weights.safetensors`` file or the folder holding it) as an Adapter: a
    ``lora`` component, and a ``dora`` one for modules with a magnitude."""
    weights = _weights(path)
    if not weights.is_file():
        if Path(path).is_dir() and (Path(path) / PICKLED_WEIGHTS_FILE).is_file():
            raise FormatError(f"only {PICKLED_WEIGHTS_FILE} is present: it is a pickle, which adapterkit never loads "
                              "(save with safe_serialization=True)", path)
        raise FormatError(f"no {WEIGHTS_FILE}", path)
    try:
        buffer = safetensors.map_file(weights)
        header = safetensors.read_header(buffer)
        tensors = {name: safetensors.tensor(buffer, header, name) for name in header.entries}
        configs = _configs(header.metadata)
        modules = sd_base.base_modules(base) if base is not None else None
        adapter = _convert(tensors, configs, modules)
        sd_base.record(adapter, base)
        adapter.validate()
    except AdapterError as exc:
        raise (exc if exc.path else exc.at(weights)) from None
    return adapter


def _configs(metadata) -> dict[str, dict]:
    """Each component's LoRA config from ``lora_adapter_metadata`` (``{"unet.r": 4}`` -> ``{"unet": {"r": 4}}``)."""
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        return {}
    try:
        flat = safetensors.strict_json(metadata[METADATA_KEY], METADATA_KEY)
    except FormatError:
        raise FormatError(f"the metadata {METADATA_KEY} is not JSON") from None
    if not isinstance(flat, dict):
        raise FormatError(f"the metadata {METADATA_KEY} is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, dot, field = key.partition(".")
        if dot:
            configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        for option in UNSUPPORTED_OPTIONS:
            if config.get(option):
                raise FormatError(f"{component}: LoRA option {option}={config[option]!r} is not supported")
    return configs


def _parse(component: str, rest: str, modules) -> tuple[str, str]:
    """``(module, role)`` of a key without its component (role: lora_A, lora_B, magnitude, alpha)."""
    rest = rest.replace(".processor.", ".")
    for suffix, role in SUFFIXES.items():
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if role == "alpha" and (module.endswith(".down.weight") or OLD_ATTENTION.match(module + ".down.weight")
                                    or OLD_OTHER.match(module + ".down.weight")):
                # diffusers' network alphas name the down weight or the old LoRA layer
                stem = module if module.endswith(".down.weight") else module + ".down.weight"
                return _parse(component, stem, modules)[0], "alpha"
            return module, role
    match = OLD_ATTENTION.match(rest)
    if match:
        text = component.startswith("text_encoder")
        names = [PROJECTIONS[text][match["projection"]], PROJECTIONS[not text][match["projection"]]]
        module = f"{match['module']}.{names[0]}"
        if modules is not None and module not in modules.get(component, {}):
            other = f"{match['module']}.{names[1]}"
            module = other if other in modules.get(component, {}) else module
        return module, "lora_A" if match["role"] == "down" else "lora_B"
    match = OLD_OTHER.match(rest)
    if match:
        return match["module"], "lora_A" if match["role"] == "down" else "lora_B"
    if rest.endswith(".lora_B.bias"):
        raise FormatError(f"{component}.{rest}: LoRA with a bias on B (lora_bias) is not supported")
    raise FormatError(f"tensor {component}.{rest!r} is not part of a diffusers LoRA")


def _convert(tensors: dict[str, np.ndarray], configs: dict[str, dict], modules) -> Adapter:
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, value in tensors.items():
        component, rest = split_target(key, KNOWN_COMPONENTS)
        if component is None:
            raise FormatError(f"tensor {key!r} does not start with a pipeline component (unet., transformer., "
                              "text_encoder., text_encoder_2.)")
        module, role = _parse(component, rest, modules)
        found.setdefault((component, module), {})[role] = value
        keys.setdefault((component, module), key)
    if not found:
        raise FormatError("the file holds no tensors")
    held, alphas, scalings = {}, {}, {}
    for (component, module), roles in sorted(found.items()):
        key = keys[component, module]
        if "lora_A" not in roles or "lora_B" not in roles:
            if set(roles) == {"alpha"}:
                continue  # an alpha of a module without factors: diffusers ignores it too
            raise FormatError(f"{component}.{module} lacks its down (lora_A) or up (lora_B) weight")
        target, shape = sd_base.resolve(component, module, modules, key)
        a, b = sd_base.fitted(target, roles["lora_A"], roles["lora_B"], shape)
        held[target] = {"lora_A": a, "lora_B": b}
        config = configs.get(component, {})
        rank = int(a.shape[0])
        if "alpha" in roles:
            alphas[target] = sd_base.number(roles["alpha"], f"{component}.{module}.alpha")
        elif "lora_alpha" in config:
            alphas[target] = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        else:
            alphas[target] = rank  # diffusers' convention without a config or alphas: scale 1
        scalings[target] = "rslora" if config.get("use_rslora") else "standard"
        if "magnitude" in roles:
            magnitude = roles["magnitude"].reshape(-1)
            if a.ndim != 2 or magnitude.shape[0] != b.shape[0]:
                raise FormatError(f"{target}: a magnitude of shape {list(roles['magnitude'].shape)} does not fit "
                                  f"lora_B {list(b.shape)} (adapterkit's DoRA adapts Linear modules)")
            held[target]["magnitude"] = magnitude
    if not held:
        raise FormatError("the file holds no LoRA factors")
    return sd_base.adapter_from(held, alphas, scalings)


# ---------------------------------------------------------------- writing


def write(adapter: Adapter, path, base=None, inputs=(), overwrite: bool = False) -> None:
    """Write ``adapter`` in diffusers' PEFT-style layout with its ``lora_adapter_metadata``. Targets carry their
    component's name; an adapter made on a bare model folder needs it as ``base``."""
    modules = sd_base.base_modules(base) if base is not None else None
    tensors: dict[str, np.ndarray] = {}
    by_component: dict[str, list] = {}
    for kind, target, a, b, alpha, magnitude in sd_base.written_targets(adapter, "diffusers", path):
        component, module = split_target(target, KNOWN_COMPONENTS)
        if component is None and modules is not None and len(modules) == 1:
            component, module = next(iter(modules)), target
        if component is None:
            raise RequestError(f"target {target!r} does not say which part of the pipeline it adapts (unet., "
                               "transformer., text_encoder. in front): give the model folder it was made on as --base",
                               path)
        if modules is not None:
            sd_base.fitted(target, a, b, sd_base.resolve(component, module, modules, target)[1])
        tensors[f"{component}.{module}.lora_A.weight"] = a
        tensors[f"{component}.{module}.lora_B.weight"] = b
        if magnitude is not None:
            tensors[f"{component}.{module}.lora_magnitude_vector"] = magnitude
        by_component.setdefault(component, []).append((module, int(a.shape[0]), alpha, magnitude is not None))
    metadata = {}
    for component, entries in by_component.items():
        metadata.update({f"{component}.{field}": value for field, value in _config(component, entries, path).items()})
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    file_output = os.fspath(path).endswith(".safetensors")
    with output(path, inputs=[*inputs, *([base] if base else [])], folder=not file_output, overwrite=overwrite,
                owned=[WEIGHTS_FILE]) as temporary:
        safetensors.write_file(temporary if file_output else temporary / WEIGHTS_FILE, tensors, metadata=header)


def _config(component: str, entries: list, path) -> dict:
    """The ``LoraConfig`` fields of one component: the most common rank and α, patterns for the others."""
    if len({dora for *_, dora in entries}) > 1:
        raise RequestError(f"the {component} targets mix DoRA and LoRA, which diffusers' one LoRA config per "
                           "component (use_dora) cannot express", path)
    rank = Counter(r for _, r, _, _ in entries).most_common(1)[0][0]
    alpha = Counter(a for _, _, a, _ in entries).most_common(1)[0][0]
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(m for m, *_ in entries),
            "rank_pattern": {m: r for m, r, _, _ in entries if r != rank},
            "alpha_pattern": {m: a for m, _, a, _ in entries if a != alpha},
            "use_rslora": False, "use_dora": entries[0][3], "lora_dropout": 0.0, "bias": "none",
            "init_lora_weights": True}
