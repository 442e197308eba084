"""Run the ``adapterkit`` command line in a subprocess, as a user would (shared by the CLI tests of the file tools)."""

from __future__ import annotations

import subprocess
import sys

ENTRY_POINT = "from adapterkit.cli import main; main()"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY_POINT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
