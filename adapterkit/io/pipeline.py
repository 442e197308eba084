"""diffusers pipeline folders: what they hold, and which of their model folders an adapter target lands in.

A pipeline folder (``save_pretrained`` of a ``DiffusionPipeline``) holds ``model_index.json`` and one sub-folder per
component: model folders (``unet/``, ``transformer/``, ``vae/`` with ``config.json`` and
``diffusion_pytorch_model.safetensors``, sharded with ``diffusion_pytorch_model.safetensors.index.json``; text encoders
``text_encoder/``, ``text_encoder_2/`` as transformers folders with ``model.safetensors``) and folders without weights
(``tokenizer/``, ``scheduler/``).

Targets of an adapter for a pipeline carry their component's name in front, as diffusers' own LoRA files name them:
``unet.down_blocks.0.resnets.0.conv1``, ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``. Merged into
the pipeline folder, each target lands in its component's folder; merged into one component folder (``unet/`` of a
pipeline, or a folder named as a component), only the targets with that component's name are merged, without it.

The fingerprint of a pipeline (spec §7) is that of its denoiser (``unet/``, ``transformer/``): the component that
tells pipelines apart (text encoders and VAEs are shared by many). Numpy only: nothing here imports diffusers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from adapterkit.errors import FormatError
from adapterkit.io.paths import open_regular

MODEL_INDEX = "model_index.json"
#: the weight files of a model folder: transformers' name, then diffusers'
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
INDEX_FILES = tuple(f"{name}.index.json" for name in WEIGHT_FILES)
#: the component that denoises, in the order they are looked for (its fingerprint is the pipeline's)
DENOISERS = ("unet", "transformer", "prior", "decoder")
#: names diffusers gives the components adapters are trained on (a folder so named is taken as that component even
#: outside a pipeline folder)
KNOWN_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder",
                    "controlnet", "vae")


def is_pipeline(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / MODEL_INDEX).is_file()


def has_weights(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a model folder with safetensors weights (single file or sharded)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in (*WEIGHT_FILES, *INDEX_FILES))


def components(pipeline: str | os.PathLike) -> list[str]:
    """The pipeline's components that are model folders with safetensors weights, in ``model_index.json`` order (then
    any other sub-folder with weights)."""
    pipeline = Path(pipeline)
    try:
        with open_regular(pipeline / MODEL_INDEX) as handle:
            index = json.load(handle)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{MODEL_INDEX} is not JSON", pipeline) from None
    if not isinstance(index, dict):
        raise FormatError(f"{MODEL_INDEX} is not a JSON object", pipeline)
    named = [name for name, value in index.items() if isinstance(value, list) and not name.startswith("_")]
    others = sorted(p.name for p in pipeline.iterdir() if p.is_dir() and p.name not in named)
    return [name for name in (*named, *others) if has_weights(pipeline / name)]


def denoiser(pipeline: str | os.PathLike) -> Path:
    """The model folder whose fingerprint is the pipeline's: its UNet or transformer (else its first component)."""
    found = components(pipeline)
    if not found:
        raise FormatError("a diffusers pipeline folder without any model folder holding safetensors weights", pipeline)
    name = next((c for c in DENOISERS if c in found), found[0])
    return Path(pipeline) / name


def pipeline_of(folder: str | os.PathLike) -> Path | None:
    """The pipeline folder ``folder`` is a component of (its parent, when that is a pipeline listing it)."""
    folder = Path(os.path.abspath(folder))
    parent = folder.parent
    if is_pipeline(parent) and folder.name in components(parent):
        return parent
    return None


def component_name(folder: str | os.PathLike) -> str | None:
    """The component a model folder is: its name inside a pipeline folder, or its own name when that is one diffusers
    gives components (``unet``, ``text_encoder_2``, ...); None for any other folder."""
    folder = Path(os.path.abspath(folder))
    if pipeline_of(folder) is not None or folder.name in KNOWN_COMPONENTS:
        return folder.name
    return None


def split_target(target: str, names) -> tuple[str | None, str]:
    """``(component, rest)`` of a target whose first segment names one of ``names`` (``unet.conv_in`` ->
    ``("unet", "conv_in")``), else ``(None, target)``."""
    head, dot, rest = target.partition(".")
    if dot and head in names:
        return head, rest
    return None, target
