"""The ``compose`` command: combine adapters into one file (see :mod:`adapterkit.compose`)."""

from __future__ import annotations

import os

import click

from adapterkit.cli.options import parse_weights

from adapterkit.compose import METHODS, compose as compose_adapters
from adapterkit.fileformat import save
from adapterkit.sources import load_adapter, local_path
from adapterkit.summary import sha256_of


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", help="Comma-separated weights, one per adapter (negative subtracts).  [default: 1 each]")
@click.option("--method", default="concat", metavar="|".join(METHODS),
              help="concat: exact, rank Σrᵢ. svd: compress to --rank/--tol from the factors. ties/dare: merge the "
                   "dense deltas (needs --density), then compress.")
@click.option("--rank", type=int, help="Rank of the result (svd, ties, dare).  [default: the largest input rank]")
@click.option("--tol", type=float, help="Per target, the smallest rank whose relative Frobenius error is at most TOL.")
@click.option("--density", type=float, help="ties/dare: fraction of each delta's entries to keep.")
@click.option("--seed", type=int, default=0, help="dare: seed of the random drops.")
@click.option("--name", default="composed", help="Name of the output component (NAME_<kind> for several kinds).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output adapter file.")
def compose(adapters, weights, method, rank, tol, density, seed, name, output) -> None:
    """Combine ADAPTERS (paths or hf:// references) for one base model into one adapter file."""
    paths = [local_path(ref) for ref in adapters]
    sources = [{"name": os.path.basename(ref.rstrip("/")) if not ref.startswith("hf://") else ref,
                "sha256": sha256_of(path)} for ref, path in zip(adapters, paths)]
    weights = parse_weights(weights, len(adapters))
    result = compose_adapters([load_adapter(path) for path in paths], weights, method, rank, tol, density, seed,
                              sources, name)
    save(result, output)
    click.echo(f"wrote {output}: {', '.join(_component_line(result, c) for c in result.components)}")
    error = result.manifest.composition["error"]
    if error and error.get("per_target"):
        for target, entry in error["per_target"].items():
            click.echo(f"  {target:<48} rank {entry['rank']:>4}  relative error {entry['relative']:.3e}  "
                       f"absolute {entry['absolute']:.3e}")
        click.echo(f"relative Frobenius error {error['relative']:.3e} (absolute {error['absolute']:.3e})")


def _component_line(adapter, component) -> str:
    if component.kind != "lora":
        return f"{component.name} ({component.kind})"
    ranks = sorted({int(roles["lora_A"].shape[0]) for roles in adapter.component_tensors(component.name).values()})
    return f"{component.name} (lora, rank {'/'.join(map(str, ranks))}, {len(component.targets)} targets)"
