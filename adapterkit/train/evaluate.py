"""Losses and metrics: the per-example loss training minimises, and evaluation on held-out data.

Every example weighs the same: a causal LM's example loss is the mean cross-entropy over its predicted tokens, a
classifier's the cross-entropy of its label; a batch's loss is the mean over examples. Defined this way, a batch split
across processes gives the same gradient as the whole batch in one (see :mod:`adapterkit.train.loop`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapterkit.train.data import Collator, Examples


def example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, logits)``: one loss per example, and the model's logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task == "classify":
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none"), logits
    targets = batch["labels"][:, 1:]  # token t predicts token t+1
    token_losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
    counts = (targets != -100).sum(dim=1).clamp(min=1)
    return token_losses.sum(dim=1) / counts, logits


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, examples: Examples, task: str, batch_size: int = 32,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """``{"loss": mean example loss}``, plus ``"accuracy"`` for classification. Leaves the model's mode as it was."""
    was_training = model.training
    model.eval()
    collate = Collator(examples, tokenizer)
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(range(start, min(start + batch_size, len(examples))))).items()}
            losses, logits = example_losses(model, batch, task)
            total_loss += losses.sum().item()
            if task == "classify":
                correct += (logits.argmax(dim=-1) == batch["labels"]).sum().item()
    finally:
        model.train(was_training)
    metrics = {"loss": total_loss / len(examples)}
    if task == "classify":
        metrics["accuracy"] = correct / len(examples)
    return metrics


def evaluate_adapters(base, adapters: list, task: str, data, text_field: str = "text", label_field: str = "label",
                      batch_size: int = 32, force: bool = False, precision: str = "float32") -> dict[str, float]:
    """Metrics of the base model folder ``base`` with ``adapters`` attached, on the records of ``data``. Class ids
    follow the labels recorded at training (``training.labels``), else the sorted labels of ``data``. The base is held
    in ``precision`` (:mod:`adapterkit.precision`), the adapters' tensors in float32 over it, as in training."""
    from adapterkit.attach import attach
    from adapterkit.precision import holds_linear_weights
    from adapterkit.train.base import load_base
    from adapterkit.train.data import load_examples

    trained_labels = next((a.manifest.training["labels"] for a in adapters
                           if a.manifest.training and a.manifest.training.get("labels")), None)
    examples = load_examples(data, text_field, label_field if task == "classify" else None, trained_labels)
    loaded = load_base(base, task, examples.labels, precision=precision)
    low = precision != "float32"
    with attach(loaded.model, adapters, force=force, dtype=torch.float32 if low else None,
                reference=base if holds_linear_weights(precision) else None):
        return evaluate(loaded.model, loaded.tokenizer, examples, task, batch_size)
