"""Commands that look at files: inspect, validate, fingerprint. No torch is imported."""

from __future__ import annotations

import json
import os

import click

from adapterkit.errors import AdapterError
from adapterkit.sources import load_adapter, local_path
from adapterkit.summary import describe, describe_folder, render, render_folder
from adapterkit.text import printable


@click.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(file: str, as_json: bool) -> None:
    """Show what an adapter FILE holds and which base model it belongs to; or, for a folder that `merge` or
    `export` wrote, which adapters went into it."""
    if os.path.isdir(file):
        summary = describe_folder(file)
        click.echo(json.dumps(summary, indent=2) if as_json else render_folder(summary))
        return
    path = local_path(file)
    summary = describe(load_adapter(path), path)
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@click.command()
@click.argument("files", nargs=-1, required=True)
def validate(files: tuple[str, ...]) -> None:
    """Check adapter FILES against the format spec. Exit 1 with one line per invalid file."""
    invalid = 0
    for file in files:
        try:
            load_adapter(file)
        except AdapterError as exc:
            invalid += 1
            click.echo(f"invalid: {printable(exc)}")
        else:
            click.echo(f"valid: {printable(file)}")
    if invalid:
        raise SystemExit(1)


@click.command("fingerprint")
@click.argument("base", type=click.Path(exists=True))
def fingerprint_command(base: str) -> None:
    """Print the fingerprint of a BASE model folder or safetensors checkpoint (spec §7)."""
    from adapterkit.fingerprints import fingerprint

    click.echo(fingerprint(base))
