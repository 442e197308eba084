"""The ``example`` command: write the built-in tiny example (see :mod:`adapterkit.example`)."""

from __future__ import annotations

import click

from adapterkit.cli.options import OVERWRITE


@click.command()
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to write the example into (created; must be empty or absent).")
@OVERWRITE
def example(output, overwrite) -> None:
    """Write a tiny Llama and a tiny BERT (random, with tokenizers) and small JSONL data sets, offline."""
    from adapterkit.example import build_example

    for name, path in build_example(output, overwrite).items():
        click.echo(f"{name:<16} {path}")
