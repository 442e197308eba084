"""LoRA in PEFT's files (``peft_type: LORA``): how our ``lora`` component maps to PEFT's keys and config.

``<target>.lora_A.weight`` [r, in] and ``<target>.lora_B.weight`` [out, r] are our ``lora_A``/``lora_B``;
embeddings store ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r], whose ΔW = (B·A)ᵀ is our LoRA
with ``fan_in_fan_out`` for that target. Reading, ``use_rslora`` is ``scaling: rslora`` and ``rank_pattern`` /
``alpha_pattern`` become per-target ``target_params``.

Writing is portable: one ``lora_alpha``, no ``alpha_pattern``, ``use_rslora: false``, and whatever differs between
targets (alpha, rank under rsLoRA, the component weight) folded into B (:func:`adapterkit.kinds.lora.uniform_alpha`),
so that ΔW is exact for a reader that ignores ``alpha_pattern``, ``rank_pattern`` and ``use_rslora`` and takes each
rank from the tensors (llama.cpp's ``convert_lora_to_gguf.py``) as well as for PEFT itself. ``rank_pattern`` is still
written: PEFT builds its modules' shapes from it.
"""

from __future__ import annotations

import re

import numpy as np

from adapterkit.errors import FormatError
from adapterkit.kinds.lora import uniform_alpha
from adapterkit.manifest import Component

PEFT_TYPE = "LORA"
#: LoRA options whose adapters this mapping cannot express: refused when set
UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices", "layer_replication",
                       "use_qalora", "use_bdlora", "alora_invocation_tokens")
SUFFIXES = {".lora_A.weight": ("lora_A", False), ".lora_B.weight": ("lora_B", False),
            ".lora_embedding_A": ("lora_A", True), ".lora_embedding_B": ("lora_B", True)}


def claims(config: dict) -> bool:
    """A LORA config is ours unless it is DoRA's (``use_dora``)."""
    return not config.get("use_dora")


def empty_config() -> dict:
    """The config of a PEFT LoRA adapter before any component fills it (other kinds ride on it: biases, heads)."""
    return {"peft_type": PEFT_TYPE, "task_type": None, "r": 8, "lora_alpha": 8, "target_modules": [],
            "use_rslora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
            "modules_to_save": None, "lora_dropout": 0.0}


def read(config: dict, tensors: dict[str, np.ndarray], context: dict) -> list[tuple[Component, dict]]:
    """Take the LoRA tensors out of ``tensors`` (PEFT keys without ``base_model.model.``) as one component."""
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise FormatError(f"PEFT option {option}={config[option]!r} is not supported")
    lora: dict[str, dict[str, np.ndarray]] = {}
    embeddings = set()
    for key in list(tensors):
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        role, is_embedding = SUFFIXES[suffix]
        target = key[: -len(suffix)]
        lora.setdefault(target, {})[role] = tensors.pop(key)
        if is_embedding:
            embeddings.add(target)
    context["wrapped"] = set(lora)
    if not lora:
        return []
    rank, alpha = config["r"], config["lora_alpha"]
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    params = {"rank": rank, "alpha": alpha, "scaling": "rslora" if config.get("use_rslora") else "standard",
              "fan_in_fan_out": fan_in_fan_out}
    target_params = {}
    for target, roles in lora.items():
        if set(roles) != {"lora_A", "lora_B"}:
            raise FormatError(f"LoRA target {target!r} lacks lora_A or lora_B")
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
    return [(Component("lora", "lora", sorted(lora), params, target_params), lora)]


def _pattern_value(patterns: dict, target: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module whose name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", target):
            return value
    return default


def write(component: Component, tensors: dict, config: dict, context: dict) -> dict[str, np.ndarray]:
    """PEFT's keys for one LoRA component, filling ``config``: one alpha, the per-target scales folded into B."""
    ranks = {target: int(roles["lora_A"].shape[0]) for target, roles in tensors.items()}
    alpha, factors = uniform_alpha(component, ranks, component.weight)
    config.update(r=component.params["rank"], lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                  target_modules=component.targets, use_rslora=False, alpha_pattern={},
                  fan_in_fan_out=bool(component.params.get("fan_in_fan_out", False)))
    context["wrapped"] = set(component.targets)
    embeddings = _embeddings(component, context.get("base"))
    out = {}
    for target, roles in tensors.items():
        if ranks[target] != config["r"]:
            config["rank_pattern"][target] = ranks[target]
        names = ("lora_embedding_A", "lora_embedding_B") if target in embeddings else ("lora_A.weight", "lora_B.weight")
        out[f"{target}.{names[0]}"] = roles["lora_A"]
        out[f"{target}.{names[1]}"] = folded(roles["lora_B"], factors[target])
    return out


def folded(b: np.ndarray, factor: float) -> np.ndarray:
    """B times a scale factor (float32; B itself when the factor is 1): α/r·(f·B)·A = f·(α/r)·B·A."""
    return b if factor == 1 else (b.astype(np.float64) * factor).astype(np.float32)


def _embeddings(component: Component, base) -> set[str]:
    """The targets that are embeddings (PEFT names their factors ``lora_embedding_A/B``; for Linear and Conv1D
    modules PEFT sets the layout from the module type itself). With the base, from its module types; without it,
    the targets whose layout differs from the component's [in, out] (an embedding among Linear modules)."""
    if base is not None:
        import torch

        from adapterkit.targets import resolve_module, skeleton

        model = skeleton(base)
        modules = dict(model.named_modules())
        return {t for t in component.targets
                if isinstance(modules.get(resolve_module(t, modules) or t), torch.nn.Embedding)}
    common = bool(component.params.get("fan_in_fan_out", False))
    return {t for t in component.targets if component.param(t, "fan_in_fan_out", False) and not common}
