"""adapterkit convert: to and from other adapter formats (one converter module per format, in converters/)."""

from __future__ import annotations

import click

from adapterkit.converters.registry import FORMATS, converter, detect_format
from adapterkit.errors import AdapterError
from adapterkit.fileformat import save
from adapterkit.sources import load_adapter


@click.command()
@click.argument("source")
@click.option("--to", "target_format", type=click.Choice(["adapterkit", *FORMATS]), default=None,
              help="Output format [default: adapterkit for a foreign input; required for an adapterkit input].")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file or folder.")
@click.option("--base", type=click.Path(exists=True), default=None,
              help="Base model folder: some formats need it (e.g. to fingerprint a foreign adapter).")
def convert(source: str, target_format: str | None, output: str, base: str | None) -> None:
    """Convert an adapter between formats; the input format is detected."""
    source_format = detect_format(source)
    if source_format == "adapterkit":
        if target_format in (None, "adapterkit"):
            raise AdapterError("the input is already an adapterkit file: say --to FORMAT", source)
        converter(target_format).write(load_adapter(source), output, base=base)
    else:
        if target_format not in (None, "adapterkit"):
            raise AdapterError(f"converting {source_format} to {target_format}: go through adapterkit first", source)
        save(converter(source_format).read(source, base=base), output)
    click.echo(f"wrote {output}")
