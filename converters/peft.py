"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) to adapterkit and back.

What maps to what (PEFT's names are those of ``PeftModel.save_pretrained``; every key starts ``base_model.model.``):

- LoRA: ``<target>.lora_A.weight`` [r, in] and ``<target>.lora_B.weight`` [out, r] are our ``lora_A``/``lora_B``;
  embeddings store ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r], whose ΔW = (B·A)ᵀ is our LoRA
  with ``fan_in_fan_out`` for that target. ``use_rslora`` is ``scaling: rslora``; ``rank_pattern``/``alpha_pattern``
  become per-target ``target_params`` (and back, one entry per target).
- ``modules_to_save`` tensors (a task head, saved whole) and targeted embedding layers saved whole
  (``<target>.base_layer.weight``, PEFT's ``save_embedding_layers``) become a ``full`` component.
- ``bias="all"`` / ``"lora_only"`` saves the *trained* biases (``<target>.base_layer.bias`` for a LoRA-wrapped module,
  ``<module>.bias`` otherwise); our ``bitfit`` holds Δb = trained − base, so both directions need the base model.
- Prefix tuning: ``prompt_embeddings`` [p, layers·2·kv_heads·head_dim] is read by PEFT's ``get_prompt`` as
  view(p, 2·layers, heads, head_dim) permuted to [2·layers, heads, p, head_dim], layer i taking key 2i and value 2i+1;
  we store each layer's key and value [kv_heads, p, head_dim] on its attention module, found in the base (so reading
  one needs the base).

``adapter_model.bin`` (pickle) is never read. Component weights are folded into what is written (B·w, Δb·w).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapterkit.adapter import Adapter, tensor_name
from adapterkit.checkpoint import Checkpoint
from adapterkit.errors import AdapterError
from adapterkit.fileformat import write_atomically
from adapterkit.fingerprint import fingerprint, full_targets
from adapterkit.manifest import BaseModel, Component, Manifest
from adapterkit.merge import resolve_module

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
#: LoRA options whose adapters these mappings cannot express: refused when set
UNSUPPORTED_LORA_OPTIONS = ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices",
                            "layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens")
LORA_SUFFIXES = {".lora_A.weight": ("lora_A", False), ".lora_B.weight": ("lora_B", False),
                 ".lora_embedding_A": ("lora_A", True), ".lora_embedding_B": ("lora_B", True)}
#: submodules of PEFT's modules_to_save wrapper, whose tensors duplicate the saved module's or the base's
WRAPPER_COPIES = (".modules_to_save", ".original_module")
#: architecture name ending -> PEFT task type (prefix tuning needs one to pick the PeftModel class)
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "Model": "FEATURE_EXTRACTION"}


def detect(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


# ---------------------------------------------------------------- reading


def read(path, base=None) -> Adapter:
    """A PEFT adapter folder as an Adapter. ``base`` (the base model folder) is needed for biases and prefixes,
    and fills the base fingerprint."""
    folder = Path(path)
    config = _read_config(folder)
    tensors = _read_weights(folder)
    peft_type = config.get("peft_type")
    try:
        if peft_type == "LORA":
            components, components_tensors = _read_lora(config, tensors, base)
        elif peft_type == "PREFIX_TUNING":
            components, components_tensors = _read_prefix(config, tensors, base)
        else:
            raise AdapterError(f"PEFT type {peft_type!r} is not supported (LORA and PREFIX_TUNING are)")
    except AdapterError as exc:
        raise AdapterError(exc.reason, folder) from None
    adapter = Adapter(Manifest(components, BaseModel(config.get("base_model_name_or_path"), config.get("revision"))),
                      components_tensors)
    if base is not None:
        adapter.manifest.base_model.fingerprint = fingerprint(base, exclude=full_targets(adapter))
    try:
        adapter.validate()
    except AdapterError as exc:
        raise AdapterError(exc.reason, folder) from None
    return adapter


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not readable JSON ({exc})", folder) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} is not a JSON object", folder)
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / PICKLED_WEIGHTS_FILE).is_file():
            raise AdapterError(f"only {PICKLED_WEIGHTS_FILE} is present: it is a pickle, which adapterkit never loads "
                               "(re-save the adapter with safe_serialization=True)", folder)
        raise AdapterError(f"no {WEIGHTS_FILE}", folder)
    try:
        tensors = load_file(weights)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise AdapterError(f"not a readable safetensors file ({exc})", weights) from None
    strange = [k for k in tensors if not k.startswith(KEY_PREFIX) and k != "prompt_embeddings"]
    if strange:
        raise AdapterError(f"tensor {strange[0]!r} does not start with {KEY_PREFIX!r}", weights)
    return {k.removeprefix(KEY_PREFIX): v for k, v in tensors.items()}


def _pattern_value(patterns: dict, target: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module whose name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", target):
            return value
    return default


def _read_lora(config, tensors, base):
    for option in UNSUPPORTED_LORA_OPTIONS:
        if config.get(option):
            raise AdapterError(f"PEFT option {option}={config[option]!r} is not supported")
    saved_modules = config.get("modules_to_save") or []
    lora: dict[str, dict[str, torch.Tensor]] = {}
    embeddings, biases, full = set(), {}, {}
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            role, is_embedding = LORA_SUFFIXES[suffix]
            target = key[: -len(suffix)]
            lora.setdefault(target, {})[role] = tensor
            if is_embedding:
                embeddings.add(target)
            continue
        module, _, parameter = key.rpartition(".")
        if module.endswith(WRAPPER_COPIES):
            continue  # bias="all" also saves the biases inside PEFT's modules_to_save wrapper: duplicates
        if _is_saved_module(module, saved_modules):
            full.setdefault(module, {})[parameter] = tensor
        elif parameter == "bias":
            biases[module.removesuffix(".base_layer")] = tensor
        elif module.endswith(".base_layer"):  # a targeted embedding layer saved whole (save_embedding_layers)
            full.setdefault(module.removesuffix(".base_layer"), {})[parameter] = tensor
        else:
            raise AdapterError(f"tensor {KEY_PREFIX + key!r} is neither LoRA, a bias nor in modules_to_save")
    components, out = [], {}
    if lora:
        component = _lora_component(config, lora, embeddings)
        components.append(component)
        out.update({tensor_name(component.name, t, role): v for t, roles in lora.items() for role, v in roles.items()})
    if biases:
        components.append(Component("bias", "bitfit", sorted(biases)))
        out.update({tensor_name("bias", t, "bias"): d for t, d in _bias_deltas(biases, base, config["bias"]).items()})
    if full:
        components.append(Component("saved_modules", "full", sorted(full)))
        out.update({tensor_name("saved_modules", t, p): v for t, params in full.items() for p, v in params.items()})
    if not components:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    return components, out


def _is_saved_module(module: str, saved_modules: list[str]) -> bool:
    """As PEFT matches ``modules_to_save``: the tensor's module, or a module above it, has a name ending with one."""
    parts = module.split(".")
    return any(".".join(parts[:i]).endswith(name) for i in range(1, len(parts) + 1) for name in saved_modules)


def _lora_component(config, lora, embeddings) -> Component:
    rank, alpha = config["r"], config["lora_alpha"]
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    params = {"rank": rank, "alpha": alpha, "scaling": "rslora" if config.get("use_rslora") else "standard",
              "fan_in_fan_out": fan_in_fan_out}
    target_params = {}
    for target, roles in lora.items():
        if set(roles) != {"lora_A", "lora_B"}:
            raise AdapterError(f"LoRA target {target!r} lacks lora_A or lora_B")
        override = {}
        target_rank = int(roles["lora_A"].shape[0])
        if target_rank != rank:
            override["rank"] = target_rank
        target_alpha = _pattern_value(config.get("alpha_pattern"), target, alpha)
        if target_alpha != alpha:
            override["alpha"] = target_alpha
        if target in embeddings and not fan_in_fan_out:
            override["fan_in_fan_out"] = True  # an embedding's ΔW is (B·A)ᵀ
        if override:
            target_params[target] = override
    return Component("lora", "lora", sorted(lora), params, target_params)


def _bias_deltas(biases: dict[str, torch.Tensor], base, mode: str) -> dict[str, torch.Tensor]:
    if base is None:
        raise AdapterError(f'bias="{mode}": PEFT stores trained biases, adapterkit the change to the base biases; '
                           "pass the base model (--base) to compute it")
    return {target: trained.float() - base_bias.float()
            for target, trained, base_bias in _with_base_biases(biases, base)}


def _with_base_biases(biases: dict[str, torch.Tensor], base):
    with Checkpoint(base) as checkpoint:
        modules = {name.rpartition(".")[0] for name in checkpoint.names()}
        for target, tensor in biases.items():
            module = resolve_module(target, modules)
            if module is None or f"{module}.bias" not in checkpoint:
                raise AdapterError(f"the base has no bias for {target!r}")
            yield target, tensor, checkpoint.get(f"{module}.bias")


def _read_prefix(config, tensors, base):
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError("prefix tuning of encoder-decoder models (num_transformer_submodules 2) is not supported")
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError("a PEFT prefix adapter holds exactly one tensor, prompt_embeddings")
    layers, heads, length = config["num_layers"], config["num_attention_heads"], config["num_virtual_tokens"]
    head_dim = config["token_dim"] // heads
    embeddings = tensors["prompt_embeddings"]
    if list(embeddings.shape) != [length, layers * 2 * heads * head_dim]:
        raise AdapterError(f"prompt_embeddings is {list(embeddings.shape)}, the config implies "
                           f"[{length}, {layers * 2 * heads * head_dim}]")
    # As PEFT's get_prompt: [p, 2L·H·D] -> [p, 2L, H, D] -> [2L, H, p, D]; layer i: key 2i, value 2i+1.
    per_layer = embeddings.view(length, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)
    targets = attention_modules(base, layers)
    out = {}
    for i, target in enumerate(targets):
        out[tensor_name("prefix", target, "prefix_key")] = per_layer[2 * i].contiguous()
        out[tensor_name("prefix", target, "prefix_value")] = per_layer[2 * i + 1].contiguous()
    return [Component("prefix", "prefix", targets, {"prefix_length": length})], out


def _base_config(base):
    import transformers

    return transformers.AutoConfig.from_pretrained(base)


def _base_skeleton(base) -> torch.nn.Module:
    """The base model's module tree, built from its config on the meta device (no weights read)."""
    import transformers

    config = _base_config(base)
    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):
        return architecture(config) if architecture is not None else transformers.AutoModel.from_config(config)


def attention_modules(base, layers: int) -> list[str]:
    """The names of the base's per-layer attention modules (outermost modules whose class ends in ``Attention``)."""
    if base is None:
        raise AdapterError("a PEFT prefix adapter does not name the attention modules it feeds: pass the base model "
                           "(--base) to find them")
    found: list[str] = []
    for name, module in _base_skeleton(base).named_modules():
        if type(module).__name__.endswith("Attention") and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    if len(found) != layers:
        raise AdapterError(f"the adapter has {layers} prefix layers but the base has {len(found)} attention modules")
    return found


# ---------------------------------------------------------------- writing


def write(adapter: Adapter, path, base=None) -> None:
    """Write ``adapter`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads unchanged."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AdapterError("output exists and is not a folder", folder)
    by_kind: dict[str, list[Component]] = {}
    for component in adapter.components:
        by_kind.setdefault(component.kind, []).append(component)
    if any(len(components) > 1 for components in by_kind.values()):
        raise AdapterError("PEFT holds one component of each kind: compose the adapter's components first", folder)
    if "prefix" in by_kind:
        if len(by_kind) > 1:
            raise AdapterError("PEFT cannot hold a prefix together with other kinds in one adapter", folder)
        config, tensors = _write_prefix(adapter, by_kind["prefix"][0], base)
    else:
        config, tensors = _write_lora(adapter, by_kind, base)
    config.update(base_model_name_or_path=adapter.manifest.base_model.id,
                  revision=adapter.manifest.base_model.revision, inference_mode=True)
    tensors = {k if k == "prompt_embeddings" else KEY_PREFIX + k: v.contiguous() for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def _write_lora(adapter: Adapter, by_kind: dict[str, list[Component]], base) -> tuple[dict, dict]:
    unknown = set(by_kind) - {"lora", "bitfit", "full"}
    if unknown:
        raise AdapterError(f"PEFT has no equivalent for a {sorted(unknown)[0]} component")
    config = {"peft_type": "LORA", "task_type": None, "r": 8, "lora_alpha": 8, "target_modules": [],
              "use_rslora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
              "bias": "none", "modules_to_save": None, "lora_dropout": 0.0}
    tensors: dict[str, torch.Tensor] = {}
    lora_targets: set[str] = set()
    for component in by_kind.get("lora", []):
        lora_targets = set(component.targets)
        tensors.update(_lora_tensors(adapter, component, config))
    for component in by_kind.get("bitfit", []):
        config["bias"] = "lora_only" if set(component.targets) <= lora_targets else "all"
        deltas = {t: roles["bias"].float() * component.weight
                  for t, roles in adapter.component_tensors(component.name).items()}
        if base is None:
            raise AdapterError("PEFT stores trained biases, adapterkit the change to the base biases: pass the base "
                               "model (--base) to compute them")
        for target, delta, base_bias in _with_base_biases(deltas, base):
            key = f"{target}.base_layer.bias" if target in lora_targets else f"{target}.bias"
            tensors[key] = (base_bias.float() + delta).to(base_bias.dtype)
    for component in by_kind.get("full", []):
        # A LoRA target's own weights saved whole go under base_layer; any other module is a module to save.
        config["modules_to_save"] = [t for t in component.targets if t not in lora_targets] or None
        for target, roles in adapter.component_tensors(component.name).items():
            module = f"{target}.base_layer" if target in lora_targets else target
            tensors.update({f"{module}.{parameter}": tensor for parameter, tensor in roles.items()})
    return config, tensors


def _lora_tensors(adapter: Adapter, component: Component, config: dict) -> dict[str, torch.Tensor]:
    config.update(r=component.params["rank"], lora_alpha=component.params["alpha"], target_modules=component.targets,
                  use_rslora=component.params.get("scaling", "standard") == "rslora",
                  fan_in_fan_out=bool(component.params.get("fan_in_fan_out", False)))
    tensors = {}
    for target, roles in adapter.component_tensors(component.name).items():
        rank, alpha = component.param(target, "rank"), component.param(target, "alpha")
        if rank != config["r"]:
            config["rank_pattern"][target] = rank
        if alpha != config["lora_alpha"]:
            config["alpha_pattern"][target] = alpha
        if component.param(target, "scaling", "standard") != component.params.get("scaling", "standard"):
            raise AdapterError(f"target {target!r} overrides the scaling rule, which PEFT cannot express")
        # An embedding is the one module PEFT stores with ΔW = (B·A)ᵀ when fan_in_fan_out is off for the rest.
        is_embedding = component.param(target, "fan_in_fan_out", False) and not config["fan_in_fan_out"]
        names = ("lora_embedding_A", "lora_embedding_B") if is_embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{target}.{names[0]}"] = roles["lora_A"]
        tensors[f"{target}.{names[1]}"] = roles["lora_B"] * component.weight  # w·ΔW = s·(w·B)·A
    return tensors


def _write_prefix(adapter: Adapter, component: Component, base) -> tuple[dict, dict]:
    if component.weight != 1:
        raise AdapterError(f"prefix component {component.name!r} has weight {component.weight}; PEFT has no weight")
    roles = adapter.component_tensors(component.name)
    layers = [roles[target] for target in component.targets]
    heads, length, head_dim = layers[0]["prefix_key"].shape
    stacked = torch.stack([t for layer in layers for t in (layer["prefix_key"], layer["prefix_value"])])
    embeddings = stacked.permute(2, 0, 1, 3).reshape(length, -1)  # the inverse of _read_prefix's view and permute
    task_type = "CAUSAL_LM"
    if base is not None:
        architecture = (_base_config(base).architectures or [""])[0]
        task_type = next((t for suffix, t in TASK_TYPES.items() if architecture.endswith(suffix)), None)
    config = {"peft_type": "PREFIX_TUNING", "task_type": task_type, "num_virtual_tokens": length,
              "num_layers": len(layers), "token_dim": heads * head_dim, "num_attention_heads": heads,
              "encoder_hidden_size": heads * head_dim, "prefix_projection": False, "num_transformer_submodules": 1}
    return config, {"prompt_embeddings": embeddings}

