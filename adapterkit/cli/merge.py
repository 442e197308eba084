"""adapterkit merge / unmerge: fold adapters into a model folder's weights, shard by shard, or take them out."""

from __future__ import annotations

import click

from adapterkit.cli.options import DTYPE, FORCE, OVERWRITE, WEIGHTS, check_weight_count

OUTPUT = click.option("-o", "--output", required=True, type=click.Path(), help="Output model folder.")


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True)
@OUTPUT
@WEIGHTS
@DTYPE
@OVERWRITE
@FORCE
def merge(base, adapters, output, weights, dtype, overwrite, force) -> None:
    """Fold ADAPTERS (files or hf:// refs) into the weights of the BASE model folder; write a model folder that
    from_pretrained loads. Streams tensor by tensor: memory stays near the largest tensor."""
    from adapterkit.merge_checkpoint import merge_checkpoint

    merge_checkpoint(base, adapters, output, check_weight_count(weights, len(adapters)), dtype, force, overwrite)
    click.echo(f"wrote {output}")


@click.command()
@click.argument("merged", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True)
@OUTPUT
@WEIGHTS
@DTYPE
@OVERWRITE
@click.option("--force", is_flag=True, help="Subtract even adapters the folder's merge record does not list.")
def unmerge(merged, adapters, output, weights, dtype, overwrite, force) -> None:
    """Subtract ADAPTERS (merged earlier with the same --weights) from the MERGED model folder."""
    from adapterkit.merge_checkpoint import unmerge_checkpoint

    unmerge_checkpoint(merged, adapters, output, check_weight_count(weights, len(adapters)), dtype, force, overwrite)
    click.echo(f"wrote {output}")
