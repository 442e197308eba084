"""AdapterHub bottleneck adapters (the ``adapters`` library, ``model.save_adapter(folder, name, use_safetensors=True)``)
to adapterkit's ``adapter`` kind.

A folder holds ``adapter_config.json`` (``{"config": {...}, "model_type", "model_class", "name", ...}``) and
``adapter.safetensors``, whose keys name the layer, the place and the adapter:

    <layer>.attention.output.adapters.<name>.adapter_down.0.weight     BERT-like models: after the attention output
    <layer>.output.adapters.<name>.adapter_up.bias                     BERT-like models: after the feed-forward output
    <layer>.attention_adapters.adapters.<name>.adapter_down.0.bias     other models (GPT-2, Llama, ...): the same two
    <layer>.output_adapters.adapters.<name>.adapter_up.weight          places, held by the block
    <...>.adapters.<name>.scaling                                      a learned scaling ([1] "learned", [d] "channel")

``adapter_down.0`` is W_down [b, d] and b_down, ``adapter_up`` W_up [d, b] and b_up. The target is the module after
whose output AdapterHub applies the adapter: the layer's attention output projection (``mh_adapter``) or its
feed-forward output projection (``output_adapter``), found from the model's structure (the base's, or a skeleton of
the config's ``model_type`` when no base is given). A scaling s (a number, or learned) multiplies W_up and b_up.

Only the configurations whose adapter reads the projection's output and adds to it read exactly as
h + W_up·f(W_down·h + b_down) + b_up (AdapterHub's ``Adapter.pre_forward``/``forward``): ``original_ln_before``
false (``DoubleSeqBnConfig``, Houlsby's; ``SeqBnConfig(original_ln_before=False)``), ``original_ln_after`` true, no
adapter layer norms, gating, PHM layers, invertible adapters or parallel adapters. The stock ``SeqBnConfig``
(``seq_bn``, Pfeiffer's) has ``original_ln_before`` true: its adapter reads LayerNorm(h + residual) but adds to h,
which is no adapter after one module; it is refused, saying so. ``pytorch_adapter.bin`` (pickle) is never read.
A prediction head saved beside the adapter (``head_config.json``) is not converted (a warning says so).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from adapterkit.adapter import Adapter, tensor_name
from adapterkit.errors import AdapterError, FormatError, RequestError
from adapterkit.fingerprint import record_base
from adapterkit.io import safetensors
from adapterkit.io.paths import open_regular
from adapterkit.kinds.adapter import non_linearity_name
from adapterkit.manifest import BaseModel, Component, Manifest

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLED_WEIGHTS_FILE = "pytorch_adapter.bin"
HEAD_CONFIG_FILE = "head_config.json"
KIND = "adapter"

#: AdapterHub's place of an adapter in a layer -> ours: after the attention or the feed-forward output projection
PLACES = {"attention.output": "attention", "attention_adapters": "attention", "output": "feedforward",
          "output_adapters": "feedforward"}
KEY = re.compile(r"^(?P<layer>.+?)\.(?P<place>attention\.output|attention_adapters|output_adapters|output)"
                 r"\.adapters\.(?P<name>[^.]+)\.(?P<param>adapter_down\.0\.weight|adapter_down\.0\.bias"
                 r"|adapter_up\.weight|adapter_up\.bias|scaling)$")
ROLES = {"adapter_down.0.weight": "down", "adapter_down.0.bias": "down_bias", "adapter_up.weight": "up",
         "adapter_up.bias": "up_bias"}
#: options (with the value that reads exactly as an adapter after a module) and why another value does not
REQUIRED = {
    "is_parallel": (False, "a parallel adapter reads the sublayer's input, not the module's output"),
    "original_ln_before": (False, "the adapter reads LayerNorm(h + residual) but adds to h (the stock seq_bn / "
                                  "Pfeiffer configuration), which is no adapter after one module; adapters trained "
                                  "with SeqBnConfig(original_ln_before=False) or DoubleSeqBnConfig convert exactly"),
    "original_ln_after": (True, "the model's own residual and layer norm after the adapter are skipped"),
    "ln_before": (False, "the adapter has a layer norm of its own before its down-projection"),
    "ln_after": (False, "the adapter has a layer norm of its own after its up-projection"),
    "use_gating": (False, "the adapter is gated"),
    "phm_layer": (False, "its projections are PHM layers (Compacter)"),
    "inv_adapter": (None, "it has invertible adapters on the embeddings"),
    "cross_adapter": (False, "it has cross-attention adapters"),
}


def detect(path) -> bool:
    """An AdapterHub adapter folder: ``adapter_config.json`` holding a ``config`` object and a ``model_type`` (a PEFT
    folder's config has neither), and its weights."""
    folder = Path(path)
    if not (folder.is_dir() and (folder / CONFIG_FILE).is_file()):
        return False
    if not ((folder / WEIGHTS_FILE).is_file() or (folder / PICKLED_WEIGHTS_FILE).is_file()):
        return False
    try:
        config = _read_config(folder)
    except AdapterError:
        return False
    return isinstance(config.get("config"), dict) and "model_type" in config and "peft_type" not in config


def read(path, base=None) -> Adapter:
    """An AdapterHub bottleneck adapter folder as an Adapter with one ``adapter`` component. ``base`` (the base model
    folder) gives the exact module names and the fingerprint; without it the structure of ``model_type`` is used."""
    folder = Path(path)
    try:
        config = _read_config(folder)
        options = _check_options(config.get("config"))
        tensors = _read_weights(folder)
        adapter = _convert(config, options, tensors, base)
        if base is not None:
            record_base(adapter.manifest.base_model, base)
        adapter.validate()
    except AdapterError as exc:
        raise exc.at(folder) from None
    if (folder / HEAD_CONFIG_FILE).is_file():
        log.warning("%s: the prediction head saved beside the adapter (%s) is not converted", folder, HEAD_CONFIG_FILE)
    return adapter


def write(adapter: Adapter, path, base=None, inputs=(), overwrite: bool = False) -> None:
    raise RequestError("adapterkit reads AdapterHub adapters but does not write them", path)


def _read_config(folder: Path) -> dict:
    with open_regular(folder / CONFIG_FILE) as handle:
        config = safetensors.strict_json(handle.read(), CONFIG_FILE)
    if not isinstance(config, dict):
        raise FormatError(f"{CONFIG_FILE} is not a JSON object")
    return config


def _check_options(options) -> dict:
    """The AdapterHub config, refused unless it is a bottleneck adapter that reads as one after a module."""
    if not isinstance(options, dict):
        raise FormatError(f"{CONFIG_FILE} has no config object (an adapter fusion or a setup is not an adapter)")
    architecture = options.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise FormatError(f"AdapterHub {architecture!r} adapters are not bottleneck adapters (adapterkit reads "
                          "AdapterHub's bottleneck adapters; PEFT's files for LoRA and prefix tuning)")
    for option, (wanted, why) in REQUIRED.items():
        value = options.get(option, wanted)
        if value != wanted:
            raise FormatError(f"AdapterHub option {option}={value!r} is not supported: {why}")
    if options.get("residual_before_ln", True) not in (True, False):
        raise FormatError(f"AdapterHub option residual_before_ln={options['residual_before_ln']!r} is not supported "
                          "without original_ln_before")
    scaling = options.get("scaling", 1.0)
    if not (scaling in ("learned", "channel") or (isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
                                                   and np.isfinite(scaling))):
        raise FormatError(f"AdapterHub option scaling={scaling!r} is not supported")
    if not isinstance(options.get("mh_adapter"), bool) or not isinstance(options.get("output_adapter"), bool):
        raise FormatError("the AdapterHub config lacks mh_adapter or output_adapter")
    try:
        options = {**options, "non_linearity": non_linearity_name(options.get("non_linearity"))}
    except RequestError as exc:
        raise FormatError(f"AdapterHub option {exc.reason}") from None
    return options


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FormatError(f"only {PICKLED_WEIGHTS_FILE} is present: it is a pickle, which adapterkit never loads "
                          "(re-save the adapter with model.save_adapter(..., use_safetensors=True))")
    try:
        buffer = safetensors.map_file(weights)
        header = safetensors.read_header(buffer)
        return {name: safetensors.tensor(buffer, header, name) for name in header.entries}
    except AdapterError as exc:
        raise exc.at(weights) from None


def _convert(config: dict, options: dict, tensors: dict[str, np.ndarray], base) -> Adapter:
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    names = set()
    for key, value in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise FormatError(f"tensor {key!r} is not part of a bottleneck adapter adapterkit reads")
        names.add(match["name"])
        role = ROLES.get(match["param"], "scaling")
        found.setdefault((match["layer"], PLACES[match["place"]]), {})[role] = value
    if not found:
        raise FormatError(f"{WEIGHTS_FILE} holds no tensors")
    if len(names) > 1:
        raise FormatError(f"{WEIGHTS_FILE} holds several adapters ({', '.join(sorted(names))})")
    places = {place for _, place in found}
    wanted = {p for p, on in (("attention", options["mh_adapter"]), ("feedforward", options["output_adapter"])) if on}
    if not places <= wanted:
        raise FormatError(f"{WEIGHTS_FILE} holds adapters at places its config does not name ({sorted(places)})")
    modules = _target_modules(config, {layer for layer, _ in found}, base)
    held = {}
    for (layer, place), roles in found.items():
        missing = [r for r in ROLES.values() if r not in roles]
        if missing:
            raise FormatError(f"the adapter of {layer} ({place}) lacks {', '.join(missing)}")
        held[modules[layer, place]] = _scaled(roles, options["scaling"], f"{layer} ({place})")
    sizes = {target: int(roles["down"].shape[0]) for target, roles in held.items()}
    size = max(set(sizes.values()), key=list(sizes.values()).count)
    params = {"bottleneck": size, "non_linearity": options["non_linearity"],
              "placement": _placement(options, places)}
    target_params = {t: {"bottleneck": b} for t, b in sizes.items() if b != size}
    name = re.sub(r"[^a-z0-9_]", "_", str(config.get("name") or next(iter(names))).lower())[:64] or KIND
    component = Component(name, KIND, list(held), params, target_params)
    model_name = config.get("model_name")
    manifest = Manifest([component], BaseModel(model_name if isinstance(model_name, str) and model_name else None))
    return Adapter(manifest, {tensor_name(name, t, role): x for t, roles in held.items() for role, x in roles.items()})


def _scaled(roles: dict[str, np.ndarray], scaling, where: str) -> dict[str, np.ndarray]:
    """s·(W_up·a + b_up) as W_up and b_up with s folded in (a number, or the learned scalar or per-channel vector)."""
    out = {role: roles[role] for role in ROLES.values()}
    if scaling in ("learned", "channel"):
        if "scaling" not in roles:
            raise FormatError(f"the adapter of {where} lacks its learned scaling")
        s = roles["scaling"].astype(np.float32).reshape(-1)
        if s.shape[0] not in (1, out["up_bias"].shape[0]):
            raise FormatError(f"the adapter of {where} has a scaling of shape {list(roles['scaling'].shape)}")
    elif "scaling" in roles:
        raise FormatError(f"the adapter of {where} holds a learned scaling but its config says scaling={scaling!r}")
    elif scaling == 1:
        return out
    else:
        s = np.float32(scaling)
    out["up"] = (out["up"].astype(np.float32) * (s[:, None] if np.ndim(s) else s)).astype(np.float32)
    out["up_bias"] = (out["up_bias"].astype(np.float32) * s).astype(np.float32)
    return out


def _placement(options: dict, places: set[str]) -> str:
    """houlsby (both places in every layer), pfeiffer (the feed-forward output in every layer), else custom."""
    if options.get("leave_out"):
        return "custom"
    if places == {"attention", "feedforward"}:
        return "houlsby"
    return "pfeiffer" if places == {"feedforward"} else "custom"


def _target_modules(config: dict, layers: set[str], base) -> dict[tuple[str, str], str]:
    """(AdapterHub layer, place) -> the module after whose output the adapter acts: the layer's attention or
    feed-forward output projection in the base's structure (its module names), else in a skeleton of
    ``model_type`` (AdapterHub's layer names kept, so targets carry the prefix of the model it was saved from)."""
    from adapterkit import targets

    if base is not None:
        model = targets.skeleton(base)
    else:
        model = _skeleton_of(config, layers)
    modules = {name for name, _ in model.named_modules()}
    outputs = {"attention": targets.attention_outputs(model), "feedforward": targets.feedforward_outputs(model)}
    found = {}
    for layer in layers:
        block = targets.resolve_module(layer, modules)
        if block is None:
            raise FormatError(f"layer {layer!r} of the AdapterHub adapter is not a module of "
                              + ("the base" if base is not None else f"a {config.get('model_type')} model"))
        for place, paths in outputs.items():
            inside = [p for p in paths if p.startswith(block + ".")]
            if len(inside) == 1:
                found[layer, place] = inside[0] if base is not None else layer + inside[0][len(block):]
    missing = sorted({layer for layer in layers} - {layer for layer, _ in found})
    if missing:
        raise FormatError(f"found no attention or feed-forward output projection in layer {missing[0]!r}")
    return found


def _skeleton_of(config: dict, layers: set[str]):
    """A meta-device model of the config's ``model_type`` with enough layers (the structure only, no weights)."""
    import torch
    import transformers

    model_type = config.get("model_type")
    count = 1 + max((int(m.group(1)) for m in (re.search(r"\.(\d+)$", layer) for layer in layers) if m), default=0)
    try:
        model_config = transformers.AutoConfig.for_model(model_type, num_hidden_layers=count)
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"model_type {model_type!r} is not one transformers knows: pass the base model "
                          "(--base)") from None
    with torch.device("meta"):
        return transformers.AutoModel.from_config(model_config)
