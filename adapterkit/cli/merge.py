"""adapterkit merge / unmerge: fold adapters into a model folder's weights, shard by shard, or take them out."""

from __future__ import annotations

import click

from adapterkit.cli.options import DTYPE, OVERWRITE, WEIGHTS, check_weight_count


def rewrite_command(folder: str, force_help: str):
    """The options merge and unmerge share: a model FOLDER, ADAPTERS, the output, weights, dtype, overwrite, force."""
    options = [
        click.command(),
        click.argument(folder, type=click.Path(exists=True, file_okay=False)),
        click.argument("adapters", nargs=-1, required=True),
        click.option("-o", "--output", required=True, type=click.Path(), help="Output model folder."),
        WEIGHTS, DTYPE, OVERWRITE,
        click.option("--force", is_flag=True, help=force_help),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


@rewrite_command("base", "Merge even if an adapter was made for another base (fingerprint).")
def merge(base, adapters, output, weights, dtype, overwrite, force) -> None:
    """Fold ADAPTERS (files or hf:// refs) into the weights of the BASE model folder; write a model folder that
    from_pretrained loads. Streams tensor by tensor: memory stays near the largest tensor."""
    from adapterkit.merge_checkpoint import merge_checkpoint

    merge_checkpoint(base, adapters, output, check_weight_count(weights, len(adapters)), dtype, force, overwrite)
    click.echo(f"wrote {output}")


@rewrite_command("merged", "Subtract even adapters the folder's merge record does not list.")
def unmerge(merged, adapters, output, weights, dtype, overwrite, force) -> None:
    """Subtract ADAPTERS (merged earlier with the same --weights) from the MERGED model folder."""
    from adapterkit.merge_checkpoint import unmerge_checkpoint

    unmerge_checkpoint(merged, adapters, output, check_weight_count(weights, len(adapters)), dtype, force, overwrite)
    click.echo(f"wrote {output}")
