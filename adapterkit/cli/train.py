"""The ``train``, ``evaluate`` and ``compare`` commands (see :mod:`adapterkit.train`).

The methods ``train`` offers and the hyper-parameters it takes (``--rank``, ``--alpha``, ``--prefix-length``, ...)
come from the kinds registry: each kind declares its training options once.
"""

from __future__ import annotations

import json

import click

from adapterkit.cli.options import BASE_PRECISION, BASE_PRECISIONS, COUNT, FORCE, OVERWRITE, Number
from adapterkit.kinds import KINDS, trainable_kinds
from adapterkit.train.base import TASKS

TEXT_FIELD = click.option("--text-field", default="text", help="Record field holding the text.")
LABEL_FIELD = click.option("--label-field", default="label", help="Record field holding the label (classify).")
TASK = click.option("--task", type=click.Choice(TASKS), default="causal-lm",
                    help="causal-lm: next-token loss. classify: a new classification head, saved with the adapter.")
BATCH_SIZE = click.option("--batch-size", type=COUNT, default=16,
                          help="Global batch size (split across torchrun processes).")
GRADIENT_CHECKPOINTING = click.option(
    "--gradient-checkpointing", is_flag=True,
    help="Recompute each layer's activations in the backward pass instead of keeping them: less memory, more time "
         "(QLoRA's setting).")
SEED = click.option("--seed", type=click.IntRange(min=0), default=0,
                    help="Seed of initialisation and shuffling: the same seed gives the same file.")


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def kind_options(command):
    """One click option per training option of the registered kinds (``--rank``, ``--alpha``, ...)."""
    seen: dict[str, list[str]] = {}
    declared = {}
    for kind in KINDS.values():
        for option in kind.train_options:
            seen.setdefault(option.name, []).append(kind.name)
            declared[option.name] = option
    for name, option in reversed(list(declared.items())):
        kinds = ", ".join(seen[name])
        value_type = COUNT if option.kind == "count" else Number(option.low, option.high)
        command = click.option(f"--{name.replace('_', '-')}", name, type=value_type, default=option.default,
                               help=f"{option.help} ({kinds})")(command)
    return command


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.option("--method", type=click.Choice(trainable_kinds()), default="lora",
              help="; ".join(f"{k}: {KINDS[k].summary}" for k in trainable_kinds()) + " (full: every base parameter, "
                   "for comparison).")
@TASK
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training records: .jsonl or .csv, optionally .gz/.bz2.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), help="Held-out records, evaluated each epoch.")
@TEXT_FIELD
@LABEL_FIELD
@click.option("--targets", help="Comma-separated module-name suffixes.  [default: per architecture]")
@kind_options
@click.option("--epochs", type=COUNT, default=1, help="Passes over the data.")
@click.option("--steps", type=COUNT, help="Optimiser steps (overrides --epochs).")
@click.option("--lr", type=Number(0, 10, low_open=True),
              help="AdamW learning rate.  [default: per method, " +
                   ", ".join(f"{k} {KINDS[k].default_lr:g}" for k in trainable_kinds()) + "]")
@BATCH_SIZE
@SEED
@BASE_PRECISION
@GRADIENT_CHECKPOINTING
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output adapter file.")
def train(base, method, task, data, eval_data, text_field, label_field, targets, epochs, steps, lr, batch_size, seed,
          base_precision, gradient_checkpointing, output, **options) -> None:
    """Train a new adapter on the model folder BASE (also under `torchrun --nproc_per_node N --no-python`)."""
    from adapterkit.io.adapter_file import save
    from adapterkit.io.outputs import refuse_overlap
    from adapterkit.train.loop import TrainConfig, train as run_training

    inputs = [base, data, *([eval_data] if eval_data else [])]
    refuse_overlap(output, inputs)  # before training, not after
    config = TrainConfig(method, task, data, eval_data, text_field, label_field, _split(targets), options, epochs,
                         steps, lr, batch_size, seed, base_precision, gradient_checkpointing)
    result = run_training(base, config, on_eval=lambda epoch, m: click.echo(f"epoch {epoch}: {format_metrics(m)}"))
    if not result.is_main:
        return
    save(result.adapter, output, inputs=inputs)
    over = "" if base_precision == "float32" else f", the base held in {base_precision}"
    click.echo(f"wrote {output}: {method}, {result.adapter.parameter_count():,} parameters, {result.steps} steps "
               f"in {result.seconds:.1f} s{over}")


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True)
@TASK
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Records to evaluate on.")
@TEXT_FIELD
@LABEL_FIELD
@click.option("--batch-size", type=COUNT, default=32)
@BASE_PRECISION
@FORCE
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(base, adapters, task, data, text_field, label_field, batch_size, base_precision, force, as_json) -> None:
    """Loss (and accuracy for classify) of BASE with ADAPTERS (paths or hf:// references) attached."""
    from adapterkit.sources import load_adapters
    from adapterkit.train.evaluate import evaluate_adapters

    metrics = evaluate_adapters(base, load_adapters(adapters), task, data, text_field, label_field, batch_size, force,
                                base_precision)
    click.echo(json.dumps(metrics, sort_keys=True) if as_json else format_metrics(metrics))


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@TASK
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Training records.")
@click.option("--eval-data", required=True, type=click.Path(exists=True, dir_okay=False), help="Held-out records.")
@click.option("--methods", default="lora,bitfit,prefix,full", help="Comma-separated methods to compare.")
@TEXT_FIELD
@LABEL_FIELD
@click.option("--steps", type=COUNT, default=50, help="Optimiser steps per method (the shared budget).")
@BATCH_SIZE
@SEED
@BASE_PRECISIONS
@GRADIENT_CHECKPOINTING
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the adapters, compare.json and compare.png.")
@OVERWRITE
def compare(base, task, data, eval_data, methods, text_field, label_field, steps, batch_size, seed, base_precisions,
            gradient_checkpointing, output, overwrite) -> None:
    """Train each method on BASE under one budget and compare storage, training memory, time per step, eval
    quality and inference latency (Lialin et al. 2023), over each base precision: with the peak training memory,
    the memory of the weights as held, and their ratio. Each method and precision runs in its own process."""
    import os

    from adapterkit.train import compare as comparison
    from adapterkit.train.loop import TrainConfig

    chosen = _split(methods) or []
    unknown = [m for m in chosen if m not in trainable_kinds()]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown method {unknown[0]!r} (known: {', '.join(trainable_kinds())})"
                                 if unknown else "name at least one method", param_hint="--methods")
    config = TrainConfig("lora", task, data, eval_data, text_field, label_field, steps=steps, batch_size=batch_size,
                         seed=seed, gradient_checkpointing=gradient_checkpointing)
    rows = comparison.compare(base, config, chosen, output,
                              progress=lambda m, p: click.echo(f"training {m} over {p} ...", err=True),
                              overwrite=overwrite, precisions=base_precisions)
    click.echo(comparison.table(rows))
    click.echo(f"wrote {os.path.join(output, comparison.RESULTS)} and {comparison.PLOT}")
