"""AdapterHub adapters (the ``adapters`` library, ``model.save_adapter(folder, name, use_safetensors=True)``) to
adapterkit: bottleneck adapters as the ``adapter`` kind, LoRA (``LoRAConfig``) as ``lora`` and (IA)³ (``IA3Config``)
as ``ia3``.

A folder holds ``adapter_config.json`` (``{"config": {...}, "model_type", "model_class", "name", ...}``) and
``adapter.safetensors``. A bottleneck adapter's keys name the layer, the place and the adapter:

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
which is no adapter after one module; it is refused, saying so.

A LoRA or (IA)³ (``"architecture": "lora"``) wraps linear modules (``attn_matrices`` of the attention with
``selfattn_lora``, the feed-forward's first layer with ``intermediate_lora``, its second with ``output_lora``); its
keys are ``<module>.loras.<name>.lora_A`` [r, in] and ``lora_B`` [out, r], and the target is that module
(``adapters/methods/lora.py``):

- ``composition_mode`` "add" (``LoRA``): y = W x + b + α/r·B·A·x, adapterkit's ``lora`` with rank r and alpha α
  (dropout acts in training only). GPT-2's fused ``c_attn`` (``LoRAMergedLinear``) holds A [n·r, in] and
  B [n·d, r] for the n of q, k, v that ``attn_matrices`` enables, group g of A's rows feeding the g-th enabled third:
  it reads as one LoRA of rank n·r whose B [3d, n·r] is that block matrix (zero in the other thirds), alpha n·α;
- ``composition_mode`` "scale" (``IA3``, r = 1, no ``lora_A``): y = (W x + b) ⊙ α·l with l = ``lora_B``, the
  module's output scaled (keys, values, and the feed-forward's first layer's output, before its activation), which
  is adapterkit's ``ia3`` with ``feedforward`` false on every target; on a fused ``c_attn`` the thirds not enabled
  are scaled by α (AdapterHub pads them with 1).

Gating (``use_gating``), DoRA (``use_dora``), VeRA (``vera_d``/``vera_b``), other composition modes and other
architectures (prefix tuning, ReFT, ...) are refused in one line. ``pytorch_adapter.bin`` (pickle) is never read.
A prediction head saved beside the adapter (``head_config.json``) is not converted (a warning says so).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from adapterkit.adapter import Adapter, tensor_name
from adapterkit.errors import AdapterError, FormatError, RequestError
from adapterkit.fingerprints import record_base
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
    """An AdapterHub adapter folder as an Adapter with one component: ``adapter`` (a bottleneck adapter), ``lora``
    (a LoRA) or ``ia3`` (an (IA)³). ``base`` (the base model folder) gives the exact module names and the fingerprint;
    without it the structure of ``model_type`` is used."""
    folder = Path(path)
    try:
        config = _read_config(folder)
        options = config.get("config")
        if isinstance(options, dict) and options.get("architecture") == "lora":
            options = _check_lora_options(options)
            adapter = _convert_lora(config, options, _read_weights(folder), base)
        else:
            options = _check_options(options)
            adapter = _convert(config, options, _read_weights(folder), base)
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
        raise FormatError(f"AdapterHub {architecture!r} adapters are not read (adapterkit reads AdapterHub's "
                          "bottleneck adapters, LoRA and (IA)³; PEFT's files for prefix tuning)")
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
    return safetensors.read_tensors(weights)[1]


def _parsed(tensors: dict[str, np.ndarray], pattern: re.Pattern, what: str) -> tuple[list, set[str]]:
    """Each tensor as (its key matched by ``pattern``, the tensor), and the adapter names; refuses a key the pattern
    does not match, no tensors, or several adapters."""
    parsed = []
    for key, value in tensors.items():
        match = pattern.match(key)
        if match is None:
            raise FormatError(f"tensor {key!r} is not part of {what} adapterkit reads")
        parsed.append((match, value))
    names = {match["name"] for match, _ in parsed}
    if not parsed:
        raise FormatError(f"{WEIGHTS_FILE} holds no tensors")
    if len(names) > 1:
        raise FormatError(f"{WEIGHTS_FILE} holds several adapters ({', '.join(sorted(names))})")
    return parsed, names


def _convert(config: dict, options: dict, tensors: dict[str, np.ndarray], base) -> Adapter:
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    parsed, names = _parsed(tensors, KEY, "a bottleneck adapter")
    for match, value in parsed:
        role = ROLES.get(match["param"], "scaling")
        found.setdefault((match["layer"], PLACES[match["place"]]), {})[role] = value
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
    return _adapter(config, names, KIND, held, params, target_params)


def _adapter(config: dict, names: set[str], kind: str, held: dict[str, dict[str, np.ndarray]], params: dict,
             target_params: dict) -> Adapter:
    """The Adapter of one component named after the AdapterHub adapter, with the model name the config records."""
    name = re.sub(r"[^a-z0-9_]", "_", str(config.get("name") or next(iter(names))).lower())[:64] or kind
    component = Component(name, kind, list(held), params, target_params)
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

    model = _model(config, layers, base)
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


def _model(config: dict, names: set[str], base):
    """The base's module tree (meta device), else that of a skeleton of the config's ``model_type``."""
    from adapterkit import targets

    return targets.skeleton(base) if base is not None else _skeleton_of(config, names)


def _skeleton_of(config: dict, names: set[str]):
    """A meta-device model of the config's ``model_type`` with enough layers for the module names (the layer index is
    their first number) (the structure only, no weights)."""
    import torch
    import transformers

    model_type = config.get("model_type")
    count = 1 + max((int(m.group(1)) for m in (re.search(r"\.(\d+)(?=\.|$)", name) for name in names) if m),
                    default=0)
    try:
        model_config = transformers.AutoConfig.for_model(model_type, num_hidden_layers=count)
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"model_type {model_type!r} is not one transformers knows: pass the base model "
                          "(--base)") from None
    with torch.device("meta"):
        return transformers.AutoModel.from_config(model_config)


# LoRA and (IA)³: AdapterHub's LoRAConfig (composition_mode "add") and IA3Config ("scale")

LORA_KEY = re.compile(r"^(?P<module>.+?)\.loras\.(?P<name>[^.]+)\.(?P<param>lora_A|lora_B)$")
#: the fused query-key-value projection's thirds, in AdapterHub's order (``LoRAMergedLinear``)
FUSED = ("q", "k", "v")
#: LoRA options (with the value that reads exactly as adapterkit's lora or ia3) and why another value does not
LORA_REQUIRED = {
    "use_gating": (False, "the LoRA is gated (a learned sigmoid gate of the layer's input multiplies it)"),
    "use_dora": (False, "AdapterHub's DoRA layout is not read (PEFT's DoRA files are)"),
    "vera_d": (None, "it is VeRA (frozen random matrices shared across layers)"),
    "vera_b": (None, "it is VeRA (frozen random matrices shared across layers)"),
}


def _check_lora_options(options: dict) -> dict:
    """A LoRAConfig / IA3Config (with LoRAConfig's defaults filled in), refused unless it reads exactly as a LoRA
    (``add``) or an (IA)³ (``scale``)."""
    for option, (wanted, why) in LORA_REQUIRED.items():
        value = options.get(option, wanted)
        if value != wanted:
            raise FormatError(f"AdapterHub option {option}={value!r} is not supported: {why}")
    mode = options.get("composition_mode", "add")
    if mode not in ("add", "scale"):
        raise FormatError(f"AdapterHub option composition_mode={mode!r} is not supported (add is LoRA, scale (IA)³)")
    rank, alpha = options.get("r"), options.get("alpha")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise FormatError(f"AdapterHub option r={rank!r} is not a positive integer")
    if mode == "scale" and rank != 1:
        raise FormatError(f"AdapterHub option r={rank!r} is not supported with composition_mode 'scale' (it is 1)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise FormatError(f"AdapterHub option alpha={alpha!r} is not a finite number")
    matrices = options.get("attn_matrices", ["q", "v"])
    if not (isinstance(matrices, list) and all(isinstance(m, str) for m in matrices)):
        raise FormatError(f"AdapterHub option attn_matrices={matrices!r} is not a list of names")
    return {**options, "composition_mode": mode, "attn_matrices": matrices}


def _convert_lora(config: dict, options: dict, tensors: dict[str, np.ndarray], base) -> Adapter:
    """One ``lora`` component (``add``: ΔW = α/r·B·A) or ``ia3`` component (``scale``: the module's output times
    α·l) whose targets are the modules AdapterHub wrapped."""
    found: dict[str, dict[str, np.ndarray]] = {}
    parsed, names = _parsed(tensors, LORA_KEY, "a LoRA or (IA)³")
    for match, value in parsed:
        found.setdefault(match["module"], {})[match["param"]] = value
    scale = options["composition_mode"] == "scale"
    kind = "ia3" if scale else "lora"
    model = _model(config, set(found), base)
    modules = dict(model.named_modules())
    heads = [i for i, m in enumerate(FUSED) if m in options["attn_matrices"]]
    held: dict[str, dict[str, np.ndarray]] = {}
    layouts: dict[str, bool] = {}
    for path, roles in found.items():
        wanted = {"lora_B"} if scale else {"lora_A", "lora_B"}
        if set(roles) != wanted:
            raise FormatError(f"the {'(IA)³' if scale else 'LoRA'} of {path} holds {', '.join(sorted(roles))}, "
                              f"not {', '.join(sorted(wanted))}")
        target, fused, fan_in_fan_out = _lora_module(path, modules, config, base)
        convert = _ia3_vector if scale else _lora_factors
        held[target] = convert(roles, options, fused, heads, path)
        layouts[target] = fan_in_fan_out
    layout = Counter(layouts.values()).most_common(1)[0][0]
    target_params = {t: {"fan_in_fan_out": f} for t, f in layouts.items() if f != layout}
    if scale:
        params = {"feedforward": False, "fan_in_fan_out": layout}
    else:
        params = {"rank": options["r"], "alpha": options["alpha"], "scaling": "standard", "fan_in_fan_out": layout}
        for target, roles in held.items():
            heads = roles["lora_A"].shape[0] // options["r"]
            if heads != 1:  # a fused projection: rank n·r, alpha n·α keep the scale α/r
                target_params.setdefault(target, {}).update(rank=heads * options["r"], alpha=heads * options["alpha"])
    return _adapter(config, names, kind, held, params, target_params)


def _lora_module(path: str, modules: dict, config: dict, base) -> tuple[str, bool, bool]:
    """The target AdapterHub's wrapped module ``path`` is (the base's module name, else AdapterHub's), whether it is
    a fused query-key-value projection (GPT-2's ``c_attn``: AdapterHub's ``LoRAMergedLinear``) and whether it stores
    its weight as [in, out] (GPT-2's Conv1D)."""
    from adapterkit import targets

    resolved = targets.resolve_module(path, modules)
    module = modules.get(resolved)
    if module is None or not isinstance(module, targets.linear_types()):
        raise FormatError(f"module {path!r} of the AdapterHub adapter is not a linear module of "
                          + ("the base" if base is not None else f"a {config.get('model_type')} model"))
    fused = resolved.rpartition(".")[2] in targets.PROJECTION_NAMES["fused"]
    return (resolved if base is not None else path), fused, not hasattr(module, "in_features")


def _third(rows: int, heads: list[int], path: str) -> int:
    """The size of one third of a fused query-key-value projection whose enabled thirds (``heads``, from
    attn_matrices) hold ``rows`` rows."""
    if not heads or rows % len(heads):
        raise FormatError(f"the adapter of the fused projection {path} has {rows} output rows, which do not fit "
                          f"the {len(heads)} thirds its attn_matrices enable")
    return rows // len(heads)


def _lora_factors(roles: dict[str, np.ndarray], options: dict, fused: bool, heads: list[int],
                  path: str) -> dict[str, np.ndarray]:
    """A [r, in] and B [out, r]; on a fused projection (``LoRAMergedLinear``: A [n·r, in], B [n·out/3, r], the g-th
    group of r rows of A feeding the g-th enabled third) B becomes the block matrix [out, n·r] that computes the same,
    zero in the thirds that are not enabled."""
    a, b = roles["lora_A"], roles["lora_B"]
    rank = options["r"]
    groups = len(heads) if fused else 1
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank * groups or b.shape[1] != rank:
        raise FormatError(f"the LoRA of {path} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, not "
                          f"[{rank * groups}, in] and [out, {rank}]")
    if not fused:
        return {"lora_A": a, "lora_B": b}
    third = _third(b.shape[0], heads, path)
    full = np.zeros((3 * third, rank * groups), dtype=b.dtype)
    for group, head in enumerate(heads):
        full[head * third:(head + 1) * third, group * rank:(group + 1) * rank] = b[group * third:(group + 1) * third]
    return {"lora_A": a, "lora_B": full}


def _ia3_vector(roles: dict[str, np.ndarray], options: dict, fused: bool, heads: list[int],
                path: str) -> dict[str, np.ndarray]:
    """l = α·lora_B (AdapterHub's ``IA3``: the module's output times lora_B·α); on a fused projection the thirds
    that are not enabled are 1·α (``LoRAMergedLinear.pad`` fills them with 1 before the scaling)."""
    b = roles["lora_B"]
    if b.ndim != 2 or b.shape[1] != 1:
        raise FormatError(f"the (IA)³ of {path} has lora_B {list(b.shape)}, not [out, 1]")
    vector = b.reshape(-1).astype(np.float32)
    if fused:
        third = _third(vector.shape[0], heads, path)
        padded = np.ones(3 * third, dtype=np.float32)
        for group, head in enumerate(heads):
            padded[head * third:(head + 1) * third] = vector[group * third:(group + 1) * third]
        vector = padded
    return {"ia3_l": vector * np.float32(options["alpha"])}
