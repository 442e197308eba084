"""The base a kohya or diffusers LoRA is resolved against: a diffusers pipeline folder, one of its model folders
(``unet/``, ``transformer/``), or a transformers text encoder folder, as ``{component: {module: weight shape}}``.

Module paths are read from the checkpoints' tensor names (``down_blocks.0.resnets.0.conv1.weight`` is module
``down_blocks.0.resnets.0.conv1`` with a weight of that shape): the modules that hold a weight, which are the ones a
LoRA can act on. Nothing is imported from diffusers or transformers; no weight is read.

Component names are diffusers' (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``): a pipeline's
sub-folders; a folder given alone is named by :func:`adapterkit.io.pipeline.component_name`, else by its config
(a diffusers model — ``_class_name`` — is ``unet`` when its class is a UNet, ``transformer`` otherwise; a transformers
model is ``text_encoder``). Adapter targets carry the component name in front (``unet.conv_in``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from collections import Counter

import numpy as np

from adapterkit.adapter import Adapter, tensor_name
from adapterkit.errors import AdapterError, FormatError, RequestError
from adapterkit.fingerprints import record_base
from adapterkit.kinds.lora import scale
from adapterkit.manifest import BaseModel, Component, Manifest
from adapterkit.io import pipeline
from adapterkit.io.checkpoint import Checkpoint
from adapterkit.io.paths import open_regular

#: {component: {module path: shape of its weight}}
Modules = dict[str, dict[str, tuple[int, ...]]]


def base_modules(base: str | os.PathLike) -> Modules:
    """The modules with a weight of each component of ``base`` (see the module docstring)."""
    base = Path(base)
    if not base.is_dir():
        raise FormatError("the base must be a diffusers pipeline folder or a model folder (unet/, text_encoder/)", base)
    if pipeline.is_pipeline(base):
        found = {name: _modules(base / name) for name in pipeline.components(base)}
        if not found:
            raise FormatError("a diffusers pipeline folder without any model folder holding safetensors weights", base)
        return found
    return {standalone_name(base): _modules(base)}


def standalone_name(folder: Path) -> str:
    """The component a model folder given alone is (see the module docstring)."""
    name = pipeline.component_name(folder)
    if name is not None:
        return name
    try:
        with open_regular(folder / "config.json") as handle:
            config = json.load(handle)
    except (AdapterError, ValueError, UnicodeDecodeError):
        config = {}
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if isinstance(class_name, str):
        return "unet" if class_name.startswith("UNet") else "transformer"
    return "text_encoder"


def _modules(folder: Path) -> dict[str, tuple[int, ...]]:
    try:
        with Checkpoint(folder) as checkpoint:
            return {name[: -len(".weight")]: tuple(checkpoint.entry(name).shape) for name in checkpoint.names()
                    if name.endswith(".weight")}
    except AdapterError as exc:
        raise (exc if exc.path else exc.at(folder)) from None


def record(adapter, base) -> None:
    """Record the base's fingerprints in ``adapter``'s manifest (a pipeline's is its denoiser's, spec §7)."""
    if base is not None:
        record_base(adapter.manifest.base_model, base)


def fitted(key: str, a: np.ndarray, b: np.ndarray, shape: tuple[int, ...] | None,
           names: tuple[str, str] = ("lora_A", "lora_B")) -> tuple[np.ndarray, np.ndarray]:
    """A and B as the module's weight needs them: 4-D on a Conv2d, 2-D on a Linear (a 1×1 convolution's factors are
    stored either way); refuses factors that do not fit the weight (``shape``; unchecked without a base)."""
    if shape is None:
        return a, b
    if len(shape) == 4 and a.ndim == 2 and b.ndim == 2 and shape[2:] == (1, 1):
        a, b = a.reshape(*a.shape, 1, 1), b.reshape(*b.shape, 1, 1)
    elif len(shape) == 2 and a.ndim == 4 and b.ndim == 4 and a.shape[2:] == (1, 1):
        a, b = a.reshape(a.shape[:2]), b.reshape(b.shape[:2])
    if (a.ndim != len(shape) or b.ndim != len(shape) or tuple(a.shape[1:]) != tuple(shape[1:])
            or b.shape[0] != shape[0] or a.shape[0] != b.shape[1]):
        raise FormatError(f"{key}: {names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} do not fit the module's "
                          f"weight {list(shape)}")
    return a, b


def resolve(component: str, module: str, modules: Modules, key: str) -> tuple[str, tuple[int, ...] | None]:
    """``(target, weight shape)`` of a module named exactly (diffusers' names); the shape is None without a base.
    Refuses a module the base's component does not have."""
    if modules is None:
        return f"{component}.{module}", None
    if component not in modules:
        raise FormatError(f"{key!r} is for the {component} component, which the base does not have (it has "
                          f"{', '.join(modules)}): give the pipeline folder as --base")
    if module not in modules[component]:
        raise FormatError(f"{key!r} names {component}.{module}, which is not a module of the base")
    return f"{component}.{module}", modules[component][module]


def adapter_from(held: dict[str, dict[str, np.ndarray]], alphas: dict[str, float], scalings: dict[str, str],
                 model_id: str | None = None) -> Adapter:
    """An adapter from LoRA (and DoRA, with a ``magnitude``) targets: one component per kind, its params the most
    common rank, alpha and scaling, the targets that differ overriding them (``target_params``)."""
    by_kind: dict[str, list[str]] = {}
    for target in sorted(held):
        by_kind.setdefault("dora" if "magnitude" in held[target] else "lora", []).append(target)
    components, tensors = [], {}
    for kind in ("dora", "lora"):  # the registry's order
        targets = by_kind.get(kind)
        if not targets:
            continue
        ranks = {t: int(held[t]["lora_A"].shape[0]) for t in targets}
        rank = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas[t] for t in targets).most_common(1)[0][0]
        scaling = Counter(scalings[t] for t in targets).most_common(1)[0][0]
        target_params = {}
        for t in targets:
            override = {key: value for key, value, common in (("rank", ranks[t], rank), ("alpha", alphas[t], alpha),
                                                                ("scaling", scalings[t], scaling)) if value != common}
            if override:
                target_params[t] = override
        params = {"rank": rank, "alpha": alpha, "scaling": scaling, "fan_in_fan_out": False}
        components.append(Component(kind, kind, targets, params, target_params))
        tensors.update({tensor_name(kind, t, role): x for t in targets for role, x in held[t].items()})
    return Adapter(Manifest(components, BaseModel(model_id)), tensors)


def number(value: np.ndarray, key: str) -> float:
    """A scalar tensor (kohya's ``.alpha``: 0-d or [1]) as a finite Python number (an int when it is whole)."""
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    if array.size != 1 or not np.isfinite(array[0]):
        raise FormatError(f"{key!r} must be one finite number, got shape {list(np.shape(value))}")
    found = float(array[0])
    return int(found) if found.is_integer() else found


#: what a writer gets per target: (kind, target, A, B with the component weight folded in, alpha for s = alpha/rank,
#: magnitude or None)
Written = tuple[str, str, np.ndarray, np.ndarray, float, np.ndarray | None]


def written_targets(adapter: Adapter, format_name: str, path) -> list[Written]:
    """The LoRA and DoRA targets of ``adapter`` as a kohya or diffusers file holds them: one pair of factors per
    module, the scale as alpha/rank (rsLoRA's α/√r is α·√r/r), a component weight folded into B."""
    out, seen = [], {}
    for component in adapter.components:
        if component.kind not in ("lora", "dora"):
            raise RequestError(f"{format_name} files hold LoRA (and DoRA) only, not a {component.kind} component "
                               f"({component.name!r}): keep the adapterkit file, or convert to PEFT", path)
        for target, roles in adapter.component_tensors(component.name).items():
            if target in seen:
                raise RequestError(f"components {seen[target]!r} and {component.name!r} both act on {target!r}: "
                                   f"{format_name} holds one LoRA per module; compose the adapter first", path)
            seen[target] = component.name
            a, b = roles["lora_A"], roles["lora_B"]
            if component.param(target, "fan_in_fan_out", False):
                raise RequestError(f"target {target!r} stores its weight as [in, out] (fan_in_fan_out), which "
                                   f"{format_name} cannot express", path)
            rank = int(a.shape[0])
            alpha = component.param(target, "alpha")
            if component.param(target, "scaling", "standard") != "standard":  # s = α/√r = (α·√r)/r
                alpha = scale(rank, alpha, component.param(target, "scaling")) * rank
            if component.weight != 1:
                b = (b.astype(np.float32) * np.float32(component.weight)).astype(np.float32)
            out.append((component.kind, target, a, b, alpha, roles.get("magnitude")))
    return out
