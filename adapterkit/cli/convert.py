"""adapterkit convert: to and from other adapter formats (one converter module per format, in converters/)."""

from __future__ import annotations

import click

from adapterkit.cli.options import OVERWRITE
from adapterkit.converters.registry import FORMATS, converter, detect_format, readable_format, writable
from adapterkit.errors import RequestError
from adapterkit.io.adapter_file import save
from adapterkit.sources import load_adapter, local_path


@click.command(help="Convert an adapter between formats; the input format is detected (adapterkit, "
               + ", ".join(FORMATS) + ").")
@click.argument("source")
@click.option("--to", "target_format", type=click.Choice(["adapterkit", *writable()]), default=None,
              help="Output format [default: adapterkit for a foreign input; required for an adapterkit input].")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file or folder.")
@click.option("--base", type=click.Path(exists=True), default=None,
              help="Base model folder: some formats need it (kohya: to resolve its module names; a diffusers "
                   "pipeline folder or a model folder), others use it to fingerprint a foreign adapter.")
@OVERWRITE
def convert(source: str, target_format: str | None, output: str, base: str | None, overwrite: bool) -> None:
    source_format = detect_format(source)
    inputs = [source, *([base] if base else [])]
    if source_format == "adapterkit":
        if target_format in (None, "adapterkit"):
            raise RequestError(f"the input is already an adapterkit file: say --to {'|'.join(writable())}", source)
        path = local_path(source)
        converter(target_format).write(load_adapter(path), output, base=base, inputs=[path, *inputs],
                                       overwrite=overwrite)
    else:
        readable_format(source_format, source)
        if target_format not in (None, "adapterkit"):
            raise RequestError(f"converting {source_format} to {target_format}: convert to adapterkit first, then "
                               f"--to {target_format}", source)
        save(converter(source_format).read(source, base=base), output, inputs=inputs)
    click.echo(f"wrote {output}")
