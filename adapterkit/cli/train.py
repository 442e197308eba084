"""The ``train``, ``evaluate`` and ``compare`` commands (see :mod:`adapterkit.train`)."""

from __future__ import annotations

import json

import click

from adapterkit.fileformat import save
from adapterkit.train.base import TASKS
from adapterkit.train.init import METHODS

TEXT_FIELD = click.option("--text-field", default="text", help="Record field holding the text.")
LABEL_FIELD = click.option("--label-field", default="label", help="Record field holding the label (classify).")
TASK = click.option("--task", type=click.Choice(TASKS), default="causal-lm",
                    help="causal-lm: next-token loss. classify: a new classification head, saved with the adapter.")


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.option("--method", type=click.Choice(METHODS), default="lora", help="What to train (full: every base parameter, for comparison).")
@TASK
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training records: .jsonl or .csv, optionally .gz/.bz2.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), help="Held-out records, evaluated each epoch.")
@TEXT_FIELD
@LABEL_FIELD
@click.option("--rank", default=8, help="LoRA rank r.")
@click.option("--alpha", default=16.0, help="LoRA alpha (scale α/r).")
@click.option("--targets", help="Comma-separated module-name suffixes.  [default: per architecture]")
@click.option("--prefix-length", default=8, help="Prefix tuning: virtual tokens per layer.")
@click.option("--epochs", default=1, help="Passes over the data.")
@click.option("--steps", type=int, help="Optimiser steps (overrides --epochs).")
@click.option("--lr", type=float, help="AdamW learning rate.  [default: lora/bitfit 1e-3, prefix 1e-2, full 1e-4]")
@click.option("--batch-size", default=16, help="Global batch size (split across torchrun processes).")
@click.option("--seed", default=0, help="Seed of initialisation and shuffling: the same seed gives the same file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output adapter file.")
def train(base, method, task, data, eval_data, text_field, label_field, rank, alpha, targets, prefix_length, epochs,
          steps, lr, batch_size, seed, output) -> None:
    """Train a new adapter on the model folder BASE (also under `torchrun --nproc_per_node N --no-python`)."""
    from adapterkit.train.loop import TrainConfig, train as run_training

    config = TrainConfig(method, task, data, eval_data, text_field, label_field, _split(targets), rank, alpha,
                         prefix_length, epochs, steps, lr, batch_size, seed)
    result = run_training(base, config, on_eval=lambda epoch, m: click.echo(f"epoch {epoch}: {format_metrics(m)}"))
    if not result.is_main:
        return
    save(result.adapter, output)
    click.echo(f"wrote {output}: {method}, {result.adapter.parameter_count():,} parameters, {result.steps} steps "
               f"in {result.seconds:.1f} s")


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True)
@TASK
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Records to evaluate on.")
@TEXT_FIELD
@LABEL_FIELD
@click.option("--batch-size", default=32)
@click.option("--force", is_flag=True, help="Attach even if an adapter was made for another base.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(base, adapters, task, data, text_field, label_field, batch_size, force, as_json) -> None:
    """Loss (and accuracy for classify) of BASE with ADAPTERS (paths or hf:// references) attached."""
    from adapterkit.sources import load_adapters
    from adapterkit.train.evaluate import evaluate_adapters

    metrics = evaluate_adapters(base, load_adapters(adapters), task, data, text_field, label_field, batch_size, force)
    click.echo(json.dumps(metrics, sort_keys=True) if as_json else format_metrics(metrics))


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@TASK
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Training records.")
@click.option("--eval-data", required=True, type=click.Path(exists=True, dir_okay=False), help="Held-out records.")
@click.option("--methods", default="lora,bitfit,prefix,full", help="Comma-separated methods to compare.")
@TEXT_FIELD
@LABEL_FIELD
@click.option("--steps", default=50, help="Optimiser steps per method (the shared budget).")
@click.option("--batch-size", default=16)
@click.option("--seed", default=0)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the adapters, compare.json and compare.png.")
def compare(base, task, data, eval_data, methods, text_field, label_field, steps, batch_size, seed, output) -> None:
    """Train each method on BASE under one budget and compare storage, training memory, time per step, eval
    quality and inference latency (Lialin et al. 2023). Each method runs in its own process."""
    import os

    from adapterkit.train import compare as comparison
    from adapterkit.train.loop import TrainConfig

    chosen = _split(methods) or []
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)})", param_hint="--methods")
    config = TrainConfig("lora", task, data, eval_data, text_field, label_field, steps=steps, batch_size=batch_size,
                         seed=seed)
    rows = comparison.compare(base, config, chosen, output, progress=lambda m: click.echo(f"training {m} ...", err=True))
    click.echo(comparison.table(rows))
    comparison.plot(rows, os.path.join(output, "compare.png"))
    click.echo(f"wrote {os.path.join(output, 'compare.json')} and compare.png")
