"""The ``adapterkit`` command line. Thin: each command parses its options, calls the library, and prints.

Commands live one module per family in this package and are imported only when used, so ``adapterkit --help`` and
``adapterkit inspect`` start fast. Any :class:`~adapterkit.AdapterError` becomes one line on stderr and exit 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings

import click

from adapterkit import __version__
from adapterkit.errors import AdapterError

#: command name -> "module:function" (modules under adapterkit.cli)
COMMANDS = {
    "inspect": "files:inspect",
    "validate": "files:validate",
    "fingerprint": "files:fingerprint_command",
    "convert": "convert:convert",
    "train": "train:train",
    "evaluate": "train:evaluate",
    "compare": "train:compare",
    "compose": "compose:compose",
    "merge": "merge:merge",
    "unmerge": "merge:unmerge",
    "export": "export:export",
    "push": "hub:push",
    "pull": "hub:pull",
    "example": "example:example",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if importlib.util.find_spec(self._module(name)) is not None]

    @staticmethod
    def _module(name: str) -> str:
        return f"adapterkit.cli.{COMMANDS[name].split(':')[0]}"

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        if importlib.util.find_spec(self._module(name)) is None:
            return None
        return getattr(importlib.import_module(self._module(name)), COMMANDS[name].split(":")[1])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="adapterkit")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def cli(verbose: bool) -> None:
    """Adapters for parameter-efficient fine-tuning: one versioned file format (LoRA, BitFit, prefix tuning) and
    the tools to train, compose, merge, export, share and convert them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _quiet_dependencies() -> None:
    """Keep the screen for adapterkit's own output: transformers' load reports and weight-loading bars, the ONNX
    exporter's notes and deprecation warnings from dependencies show only with --verbose. Called before a command's
    module (and so transformers) is imported."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> None:
    if not {"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv):
        _quiet_dependencies()
    try:
        cli.main(args=argv, prog_name="adapterkit", standalone_mode=False)
    except AdapterError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("ADAPTERKIT_DEBUG"):
            raise
        click.echo(f"error: internal error: {type(exc).__name__}: {exc} (set ADAPTERKIT_DEBUG=1 for a traceback)", err=True)
        sys.exit(2)
