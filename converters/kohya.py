"""kohya-ss LoRA files (sd-scripts; also what AUTOMATIC1111, ComfyUI and LyCORIS's LoCon read and write) to adapterkit
and back.

One ``.safetensors`` file; per adapted module::

    lora_unet_<module path, . written _>.lora_down.weight   A: [r, in], or [r, in, kh, kw] on a Conv2d
    lora_unet_<...>.lora_up.weight                          B: [out, r], or [out, r, 1, 1]
    lora_unet_<...>.alpha                                   α, a scalar: the scale is α/r (absent or 0: α = r)
    lora_unet_<...>.dora_scale                              DoRA's magnitude (LyCORIS), [out, 1] on the output axis

``lora_unet_`` names the denoiser (``unet``, else ``transformer``), ``lora_te_`` and ``lora_te1_`` the first text
encoder, ``lora_te2_`` the second (SDXL). Writing ``.`` as ``_`` loses information (``attn1_to_q`` could be
``attn1.to_q`` or ``attn1_to.q``), so names are resolved only against the modules of the base (``--base``: a diffusers
pipeline folder, or a model folder such as ``unet/`` or a text encoder's): a name that matches no module, or several,
is refused in one line. Names of the original SGM/LDM UNet (``input_blocks_4_1_…``, which sd-scripts writes for SDXL)
and of Flux's BFL checkpoints are not mapped: such files are refused, naming the key.

Targets get the component's name in front (``unet.down_blocks.0.resnets.0.conv1``), as in diffusers' own LoRA files
(see :mod:`adapterkit.io.pipeline`). Writing, α is the true one: a file read and written back keeps it (diffusers'
``convert_state_dict_to_kohya`` writes the rank instead, which changes the scale unless α = r); rsLoRA's α/√r is
written as α·√r, a component weight folded into ``lora_up``. ``.ckpt`` and ``.pt`` files (pickles) are never read.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

#: kohya's prefix -> the pipeline components it may name, in the order they are looked for
PREFIXES = {"unet": ("unet", "transformer"), "te": ("text_encoder",), "te1": ("text_encoder",),
            "te2": ("text_encoder_2",), "te3": ("text_encoder_3",)}
KEY = re.compile(r"^lora_(?P<prefix>unet|te|te1|te2|te3)_(?P<path>[A-Za-z0-9_]+)\.(?P<param>lora_down\.weight"
                 r"|lora_up\.weight|alpha|dora_scale)$")
ROLES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "dora_scale": "dora_scale", "alpha": "alpha"}
#: parameters of LyCORIS algorithms that are not LoRA, and what they are
NOT_LORA = {"hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with a Tucker core (LyCORIS)",
            ".diff": "a full weight difference (LyCORIS)", ".diff_b": "a bias difference (LyCORIS)",
            "oft_": "OFT", "boft_": "BOFT", ".w_norm": "a norm weight (LyCORIS)", ".b_norm": "a norm bias (LyCORIS)"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def claims_keys(keys) -> bool:
    """Whether tensor names are kohya's (``lora_unet_…`` / ``lora_te…_`` with ``lora_down``/``lora_up``)."""
    return any(re.match(r"^lora_(unet|te[0-9]?)_[^.]+\.(lora_down|lora_up|alpha|hada_|lokr_|dora_scale)", k)
               for k in keys)


def detect(path) -> bool:
    if not (os.path.isfile(path) and os.fspath(path).endswith(".safetensors")):
        return False
    try:
        header = safetensors.read_header(safetensors.map_file(path), allow_empty=True)
    except AdapterError:
        return False
    return claims_keys(header.entries)


# ---------------------------------------------------------------- reading


def read(path, base=None) -> Adapter:
    """A kohya LoRA file as an Adapter (a ``lora`` component, and a ``dora`` one for modules with ``dora_scale``).
    ``base`` is required: it resolves the module names."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise FormatError(f"a {path.suffix} file is a pickle, which adapterkit never loads: save the LoRA as "
                          ".safetensors (sd-scripts: --save_model_as safetensors)", path)
    if base is None:
        raise RequestError("kohya names modules with _ for ., which only the base's module list resolves: give "
                           "--base (a diffusers pipeline folder, or a unet/ or text encoder model folder)", path)
    try:
        buffer = safetensors.map_file(path)
        header = safetensors.read_header(buffer)
        tensors = {name: safetensors.tensor(buffer, header, name) for name in header.entries}
        modules = sd_base.base_modules(base)
        adapter = _convert(tensors, modules)
        sd_base.record(adapter, base)
        adapter.validate()
    except AdapterError as exc:
        raise (exc if exc.path else exc.at(path)) from None
    return adapter


def _convert(tensors: dict[str, np.ndarray], modules: sd_base.Modules) -> Adapter:
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = KEY.match(key)
        if match is None:
            what = next((what for marker, what in NOT_LORA.items() if marker in key), None)
            raise FormatError(f"tensor {key!r} is {what}, not LoRA: adapterkit reads kohya's LoRA (LoCon) files"
                              if what else f"tensor {key!r} is not part of a kohya LoRA")
        found.setdefault((match["prefix"], match["path"]), {})[ROLES[match["param"]]] = value
    if not found:
        raise FormatError("the file holds no tensors")
    names = {prefix: _name_index(prefix, modules) for prefix in {prefix for prefix, _ in found}}
    held, alphas = {}, {}
    for (prefix, name), roles in sorted(found.items()):
        kohya = f"lora_{prefix}_{name}"
        if "lora_A" not in roles or "lora_B" not in roles:
            raise FormatError(f"{kohya} lacks lora_down.weight or lora_up.weight")
        target, shape = _resolve(kohya, name, names[prefix])
        a, b = sd_base.fitted(kohya, roles["lora_A"], roles["lora_B"], shape, ("lora_down", "lora_up"))
        held[target] = {"lora_A": a, "lora_B": b}
        rank = int(a.shape[0])
        alpha = sd_base.number(roles["alpha"], f"{kohya}.alpha") if "alpha" in roles else 0
        alphas[target] = alpha or rank  # sd-scripts' LoRAModule: an absent or zero alpha is the rank
        if "dora_scale" in roles:
            held[target]["magnitude"] = _magnitude(kohya, roles["dora_scale"], shape, a)
    return sd_base.adapter_from(held, alphas, {t: "standard" for t in held})


def _name_index(prefix: str, modules: sd_base.Modules) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """kohya name (module path with _ for .) -> the ``(target, weight shape)`` of every module it could be."""
    component = next((c for c in PREFIXES[prefix] if c in modules), None)
    if component is None:
        raise FormatError(f"lora_{prefix}_ tensors are for the {' or '.join(PREFIXES[prefix])} component, which the "
                          f"base does not have (it has {', '.join(modules)}): give the pipeline folder as --base")
    index: dict[str, list] = {}
    for module, shape in modules[component].items():
        index.setdefault(module.replace(".", "_"), []).append((f"{component}.{module}", shape))
    return index


def _resolve(kohya: str, name: str, index) -> tuple[str, tuple[int, ...]]:
    matches = index.get(name, [])
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise FormatError(f"{kohya} is ambiguous: it could be {' or '.join(t for t, _ in matches)} (kohya writes . "
                          "as _)")
    hint = (" (a name of the original SGM/LDM UNet, which adapterkit does not map to diffusers' names)"
            if re.match(r"(input_blocks|middle_block|output_blocks|double_blocks|single_blocks)_", name) else "")
    raise FormatError(f"{kohya} matches no module of the base{hint}")


def _magnitude(kohya: str, scale: np.ndarray, shape: tuple[int, ...], a: np.ndarray) -> np.ndarray:
    """LyCORIS's ``dora_scale`` as our DoRA magnitude: one norm per output row ([out, 1]); the per-input-column
    form ([1, in], LyCORIS's ``wd_on_out=False``) and DoRA on a convolution are refused."""
    if a.ndim != 2:
        raise FormatError(f"{kohya}.dora_scale: DoRA on a convolution is not supported (adapterkit's dora kind adapts "
                          "Linear modules)")
    if scale.shape == (shape[0], 1) or scale.shape == (shape[0],):
        return scale.reshape(shape[0])
    raise FormatError(f"{kohya}.dora_scale has shape {list(scale.shape)}: adapterkit's DoRA keeps one magnitude per "
                      f"output row ([{shape[0]}, 1], LyCORIS wd_on_out=True); a norm per input column is not "
                      "supported")


# ---------------------------------------------------------------- writing


def write(adapter: Adapter, path, base=None, inputs=(), overwrite: bool = False) -> None:
    """Write ``adapter``'s LoRA (and DoRA) targets as a kohya file, with the true α. Targets carry their component's
    name (``unet.…``, ``text_encoder.…``); an adapter whose targets do not (made on a bare model folder) needs that
    folder as ``base``, which also checks that every kohya name resolves to one module."""
    modules = sd_base.base_modules(base) if base is not None else None
    written = sd_base.written_targets(adapter, "kohya", path)
    components = {_split(target, modules, path)[0] for _, target, *_ in written}
    second = bool(components & {"text_encoder_2", "text_encoder_3"})
    tensors, ranks, alphas, indexes = {}, [], [], {}
    for kind, target, a, b, alpha, magnitude in written:
        component, module = _split(target, modules, path)
        prefix = {"unet": "unet", "transformer": "unet", "text_encoder": "te1" if second else "te",
                  "text_encoder_2": "te2", "text_encoder_3": "te3"}[component]
        name = f"lora_{prefix}_{module.replace('.', '_')}"
        if modules is not None:  # it resolves, and to one module
            if prefix not in indexes:
                indexes[prefix] = _name_index(prefix, modules)
            _resolve(name, module.replace(".", "_"), indexes[prefix])
        tensors[f"{name}.lora_down.weight"] = a
        tensors[f"{name}.lora_up.weight"] = b
        tensors[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
        if magnitude is not None:
            tensors[f"{name}.dora_scale"] = magnitude.reshape(-1, 1)
        ranks.append(int(a.shape[0]))
        alphas.append(alpha)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(Counter(ranks).most_common(1)[0][0]),
                "ss_network_alpha": str(Counter(alphas).most_common(1)[0][0])}
    with output(path, inputs=[*inputs, *([base] if base else [])], overwrite=overwrite) as temporary:
        safetensors.write_file(temporary, tensors, metadata=metadata)


def _split(target: str, modules, path) -> tuple[str, str]:
    """``(component, module path)`` of a target: its own component name, else the base's only component."""
    from adapterkit.io.pipeline import KNOWN_COMPONENTS, split_target

    component, module = split_target(target, KNOWN_COMPONENTS)
    if component is None and modules is not None and len(modules) == 1:
        component = next(iter(modules))
    if component not in PREFIXES_OF:
        raise RequestError(f"target {target!r} does not say which part of the pipeline it adapts (kohya needs unet., "
                           "transformer., text_encoder. or text_encoder_2. in front): give the model folder it was "
                           "made on as --base", path)
    return component, module


#: the components a kohya file can name
PREFIXES_OF = {"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
