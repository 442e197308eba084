"""The ``compose`` command: combine adapters into one file (see :mod:`adapterkit.compose`). No torch is imported."""

from __future__ import annotations

import os

import click

from adapterkit.cli.options import COUNT, WEIGHTS, Number, check_weight_count
from adapterkit.compose import compose as compose_adapters
from adapterkit.compose.methods import METHODS, TIES_NORMALISATIONS
from adapterkit.io.adapter_file import save
from adapterkit.io.digest import sha256_of
from adapterkit.kinds import get_kind
from adapterkit.sources import load_adapter, local_path


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@WEIGHTS
@click.option("--method", type=click.Choice(list(METHODS)), default="concat",
              help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + ".")
@click.option("--rank", type=COUNT, help="Rank of the result (svd, ties, dare).  [default: the largest input rank]")
@click.option("--tol", type=Number(0, 1, high_open=True),
              help="Per target, the smallest rank whose relative Frobenius error is at most TOL (in [0, 1)).")
@click.option("--density", type=Number(0, 1, low_open=True), help="ties/dare: fraction of each delta's entries to keep.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="dare: seed of the random drops.")
@click.option("--ties-normalise", "normalise", type=click.Choice(TIES_NORMALISATIONS), default=None,
              help="ties: divide each entry's agreeing sum by the count of agreeing inputs (count: the paper's "
                   "disjoint mean), by the sum of their weights (weights: mergekit's ties) or not at all (none: "
                   "mergekit's dare_ties).  [default: count]")
@click.option("--name", default="composed", help="Name of the output component (NAME_<kind> for several kinds).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output adapter file.")
def compose(adapters, weights, method, rank, tol, density, seed, normalise, name, output) -> None:
    """Combine ADAPTERS (paths or hf:// references) for one base model into one adapter file."""
    check_weight_count(weights, len(adapters))
    paths = [local_path(ref) for ref in adapters]
    sources = [{"name": os.path.basename(ref.rstrip("/")) if not ref.startswith("hf://") else ref,
                "sha256": sha256_of(path)} for ref, path in zip(adapters, paths)]
    result = compose_adapters([load_adapter(path) for path in paths], weights, method, rank, tol, density, seed,
                              sources, name, normalise=normalise)
    save(result, output, inputs=paths)
    click.echo(f"wrote {output}: {', '.join(_component_line(result, c) for c in result.components)}")
    error = result.manifest.composition["error"]
    if error and error.get("per_target"):
        for target, entry in error["per_target"].items():
            click.echo(f"  {target:<48} rank {entry['rank']:>4}  relative error {entry['relative']:.3e}  "
                       f"absolute {entry['absolute']:.3e}")
        click.echo(f"relative Frobenius error {error['relative']:.3e} (absolute {error['absolute']:.3e})")


def _component_line(adapter, component) -> str:
    kind = get_kind(component.kind)
    entry = {"params": component.params, **kind.describe(component, adapter.component_tensors(component.name))}
    detail = kind.detail(entry)
    return f"{component.name} ({component.kind}{', ' + detail if detail else ''}, {len(component.targets)} targets)"
