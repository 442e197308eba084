"""Loading the base model for a task, and what the adapter records about it.

A task picks the model class: ``causal-lm`` → ``AutoModelForCausalLM``, ``classify`` →
``AutoModelForSequenceClassification`` with one output per label. Modules the checkpoint does not hold (the new
classifier, a pooler an encoder was saved without) start from a seeded random initialisation: they are the *head*,
trained in full and saved with the adapter as a ``full`` component, and left out of the base fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from adapterkit.errors import FileSystemError, FormatError, RequestError
from adapterkit.fingerprints import record_base
from adapterkit.manifest import BaseModel

log = logging.getLogger(__name__)

TASKS = ("causal-lm", "classify")


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    head: list[str]  # module paths of the newly initialised head


def load_base(path: str | os.PathLike, task: str, labels: list[str] | None = None, seed: int = 0,
              precision: str = "float32", device="cpu") -> LoadedBase:
    """The model of ``path`` (an HF folder) for ``task``, its tokenizer, and its head modules, on the CPU, held in
    ``precision`` for computing on ``device`` (:mod:`adapterkit.precision`: ``float32``, ``bfloat16``, or ``int8`` /
    ``nf4`` weights in the linear layers; the head stays as initialised). A held base is converted weight by weight
    from the mapped checkpoint, each converted weight's pages leaving the resident set (``benchmarks/low_precision.py
    --part loading``: a 1.3 GB float32 checkpoint loaded in nf4 peaked at 0.49 GB above the process, against 1.45 GB
    in float32)."""
    from adapterkit.precision import check, compute_dtype, hold, holds_linear_weights, own_storage

    check(precision)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileSystemError("the base must be a Hugging Face model folder", path)
    if task not in TASKS:
        raise RequestError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    options = {}
    if task == "classify":
        if not labels:
            raise RequestError("classification needs labels", path)
        options = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                   "label2id": {label: i for i, label in enumerate(labels)}}
    model_class = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    torch.manual_seed(seed)  # the head's initialisation
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True,
                                                  dtype=compute_dtype(precision, device), **options)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(f"cannot load the base model for {task}: {exc}", path) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:  # a decoder's classifier finds each row's last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    parameters = dict(model.named_parameters())
    head = sorted({name.rpartition(".")[0] for name in info.get("missing_keys", ()) if name in parameters})
    if head:
        log.info("new head modules (trained in full, saved with the adapter): %s", ", ".join(head))
    if holds_linear_weights(precision, device):
        hold(model.requires_grad_(False), precision, keep=head, device=device)
        own_storage(model)  # so the checkpoint's file mapping, which the conversion read whole, can go
    return LoadedBase(model, tokenizer, head)


def base_record(path: str | os.PathLike, head: list[str]) -> BaseModel:
    """The manifest's ``base_model``: the checkpoint's recorded name (``_name_or_path``) or the folder name, and the
    fingerprint of the folder without the head (what :func:`adapterkit.attach.attach` computes on the loaded model)."""
    path = os.fspath(path)
    name = None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            name = json.load(f).get("_name_or_path") or None
    except (OSError, ValueError):
        pass
    base_model = BaseModel(name or os.path.basename(os.path.normpath(path)))
    record_base(base_model, path, exclude=head)
    return base_model
