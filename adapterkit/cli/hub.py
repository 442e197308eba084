"""Commands that share adapters on the Hugging Face Hub: push, pull."""

from __future__ import annotations

import click

from adapterkit import hub
from adapterkit.converters.registry import FORMATS, on_hub
from adapterkit.sources import local_path


def with_format_options(command):
    """``--with-<format>`` for every format the converters registry marks for the Hub."""
    for name in reversed(on_hub()):
        command = click.option(f"--with-{name}", f"with_{name.replace('-', '_')}", is_flag=True,
                               help=f"Also upload the adapter as a {FORMATS[name].description}.")(command)
    return command


@click.command()
@click.argument("file")
@click.argument("repo_id")
@click.option("--revision", help="Branch to commit to (created from main if missing).  [default: main]")
@click.option("--private", is_flag=True, help="Create the repository private (ignored if it exists).")
@click.option("-m", "--message", help="Commit message.")
@with_format_options
def push(file: str, repo_id: str, revision: str | None, private: bool, message: str | None, **formats) -> None:
    """Upload adapter FILE to the Hub repository REPO_ID (NAMESPACE/NAME) in one commit, with a model card.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks another Hub."""
    chosen = [name for name in on_hub() if formats.get(f"with_{name.replace('-', '_')}")]
    pushed = hub.push(local_path(file), repo_id, revision=revision, private=private, message=message,
                      with_formats=chosen)
    click.echo(f"pushed {file} to {pushed.repo_id}@{pushed.revision}: commit {pushed.commit}")
    click.echo(pushed.commit_url)


@click.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit sha.  [default: main]")
@click.option("-o", "--output", type=click.Path(), help="Where to write the adapter.  [default: NAME.safetensors]")
def pull(repo_id: str, revision: str | None, output: str | None) -> None:
    """Download the adapter of Hub repository REPO_ID, verify its sha256 and format, and write it to OUTPUT."""
    fetched, written = hub.pull(repo_id, output, revision=revision)
    click.echo(f"pulled {fetched.repo_id}@{fetched.commit[:12]} ({fetched.filename}, sha256 {fetched.sha256[:16]}… "
               f"verified) -> {written}")
