"""The one error type that adapterkit raises for bad input.

Every problem with a file, a base model or a user's request surfaces as an :class:`AdapterError` whose message is one
line naming the thing at fault and the reason, so the CLI can print it as is and exit non-zero without a traceback.
"""

from __future__ import annotations

import os


class AdapterError(Exception):
    """Bad input: an invalid adapter file, a mismatched base model, an impossible request."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)
