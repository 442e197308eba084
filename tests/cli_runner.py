"""Run the ``adapterkit`` command line as a user would: in a subprocess (:func:`run_cli`, the real entry point and
exit status), or in this process through the same ``main()`` (:func:`call_cli`, no interpreter start-up)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

from adapterkit.cli import main

ENTRY_POINT = "from adapterkit.cli import main; main()"


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY_POINT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def call_cli(*args) -> subprocess.CompletedProcess:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["adapterkit", *map(str, args)], code, stdout.getvalue(), stderr.getvalue())
