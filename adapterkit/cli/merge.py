"""adapterkit merge / unmerge: fold adapters into a model folder's weights, shard by shard, or take them out."""

from __future__ import annotations

import click

from adapterkit.cli.options import parse_weights

from adapterkit.merge_checkpoint import OUTPUT_DTYPES, merge_checkpoint, unmerge_checkpoint


def _common(command):
    options = [
        click.option("-o", "--output", required=True, type=click.Path(), help="Output model folder."),
        click.option("--weights", default=None, help="One weight per adapter, comma-separated, e.g. 0.7,0.3."),
        click.option("--dtype", type=click.Choice(list(OUTPUT_DTYPES)), default=None,
                     help="Dtype of the written weights [default: the checkpoint's]."),
        click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and is not empty."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True)
@_common
@click.option("--force", is_flag=True, help="Merge even if an adapter was made for another base (fingerprint).")
def merge(base, adapters, output, weights, dtype, overwrite, force) -> None:
    """Fold ADAPTERS (files or hf:// refs) into the weights of the BASE model folder; write a model folder that
    from_pretrained loads. Streams tensor by tensor: memory stays near the largest tensor."""
    merge_checkpoint(base, adapters, output, parse_weights(weights, len(adapters)), dtype, force, overwrite)
    click.echo(f"wrote {output}")


@click.command()
@click.argument("merged", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True)
@_common
@click.option("--force", is_flag=True, help="Subtract even adapters the folder's merge record does not list.")
def unmerge(merged, adapters, output, weights, dtype, overwrite, force) -> None:
    """Subtract ADAPTERS (merged earlier with the same --weights) from the MERGED model folder."""
    unmerge_checkpoint(merged, adapters, output, parse_weights(weights, len(adapters)), dtype, force, overwrite)
    click.echo(f"wrote {output}")
