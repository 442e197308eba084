"""The ``adapterkit`` command line. Thin: each command parses its options, calls the library, and prints.

Commands live one module per family in this package and are imported only when used, so ``adapterkit --help`` and
``adapterkit inspect`` start fast (``inspect``, ``validate``, ``compose``, ``convert`` and ``push``/``pull`` never
import torch). Exit statuses:

- 0: done;
- 1: refused or failed, with one line on stderr naming the file and the problem (any
  :class:`~adapterkit.errors.AdapterError`, and every OS error: no space, read-only, permission denied, ...);
- 2: a usage error, the click way (a bad option or value, with the usage line), or ``internal error`` (a bug);
- 128 + N: stopped by signal N (130 for Ctrl-C, 143 for SIGTERM), its temporary files removed.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import click

from adapterkit import __version__
from adapterkit.errors import AdapterError, FileSystemError
from adapterkit.io.outputs import Terminated
from adapterkit.text import printable

#: command name -> ("module:function" under adapterkit.cli, the summary ``adapterkit --help`` shows)
COMMANDS = {
    "inspect": ("files:inspect", "Show what an adapter file (or merged / ONNX folder) holds."),
    "validate": ("files:validate", "Check adapter files against the format spec."),
    "fingerprint": ("files:fingerprint_command", "Print the fingerprint of a base model."),
    "convert": ("convert:convert", "Convert adapters to and from PEFT and ONNX Runtime adapter files."),
    "train": ("train:train", "Train a LoRA, BitFit or prefix adapter on a base model."),
    "evaluate": ("train:evaluate", "Loss (and accuracy) of a base model with adapters on a data set."),
    "compare": ("train:compare", "Train each method under one budget and compare them."),
    "compose": ("compose:compose", "Combine adapters: weighted LoRA sums, SVD, TIES, DARE, mixed kinds."),
    "merge": ("merge:merge", "Fold adapters into a base checkpoint, streamed shard by shard."),
    "unmerge": ("merge:unmerge", "Subtract merged adapters from a checkpoint again."),
    "export": ("export:export", "Export a base model with adapters to ONNX, merged or swappable."),
    "serve": ("serve:serve", "Serve a base model and its adapters over an OpenAI-compatible HTTP API."),
    "push": ("hub:push", "Upload an adapter with a model card to the Hugging Face Hub."),
    "pull": ("hub:pull", "Download an adapter from the Hub and verify it."),
    "example": ("example:example", "Write the tiny built-in example: base models and data."),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs, so ``adapterkit --help`` does not import torch."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, function = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(f"adapterkit.cli.{module}"), function)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])


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
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # torch sets its loggers' levels on import, from this variable
    # transformers imports torchao (when installed) on loading a model: its notes about CUDA-only extensions on a CPU
    # machine, and torch's about the enums it registers, are not adapterkit's business
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # numpy's floating-point warnings (overflow in a cast, ...) from adapterkit's own math: every result is checked
    # finite and refused in one line, so the warning would only add lines around that refusal
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"adapterkit(\.|$)")


def main(argv: list[str] | None = None) -> None:
    if not {"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv):
        _quiet_dependencies()
    try:
        cli.main(args=argv, prog_name="adapterkit", standalone_mode=False)
    except AdapterError as exc:
        _fail(exc, 1)
    except OSError as exc:  # the operating system refused: one line naming the path, like every other refusal
        _fail(FileSystemError.from_os_error(exc), 1)
    except MemoryError:
        _fail("not enough memory for this command (try a smaller batch, model or --dtype)", 1)
    except Terminated as exc:
        _fail(f"{exc}: stopped, temporary files removed", 128 + exc.signum)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail("interrupted: stopped, temporary files removed", 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not bad input: still one line unless asked for the traceback
        if _out_of_memory(exc):
            _fail("not enough memory for this command (try a smaller batch, model or --dtype)", 1)
        if os.environ.get("ADAPTERKIT_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set ADAPTERKIT_DEBUG=1 for a traceback)", 2)


def _out_of_memory(exc: Exception) -> bool:
    """torch's allocators report no memory with a RuntimeError (torch.OutOfMemoryError on CUDA), not MemoryError."""
    return type(exc).__name__ == "OutOfMemoryError" or (isinstance(exc, RuntimeError)
                                                         and "can't allocate memory" in str(exc))


def _fail(message, status: int) -> None:
    """One line on stderr, control characters escaped (a file's strings cannot forge a line), and exit."""
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(status)
