"""The errors adapterkit raises for bad input, one class per kind of failure.

Every problem with a file, a base model, a path or a user's request surfaces as an :class:`AdapterError` whose
message is one line naming the thing at fault and the reason, so the CLI can print it as is and exit 1 without a
traceback. Subclasses say which class of failure it is, so callers (and tests) match on types, not message text:

- :class:`FormatError`: a file breaks the format (spec/SPEC.md) or a foreign format's rules;
- :class:`BaseMismatchError`: an adapter meets a base model it was not made for;
- :class:`FileSystemError`: the operating system refused a read or a write (no space, read-only, permission denied,
  missing folder, not a regular file, an output that overlaps an input, an output another process is writing);
- :class:`RequestError`: the request itself cannot be done (a bad option value, an impossible operation such as
  merging a prefix, a result that would not be finite);
- :class:`HubError`: the Hugging Face Hub refused, failed or did not answer.
"""

from __future__ import annotations

import errno
import os


class AdapterError(Exception):
    """Bad input: an invalid adapter file, a mismatched base model, an impossible request."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def at(self, path: str | os.PathLike) -> "AdapterError":
        """The same error (same class), naming ``path``."""
        return type(self)(self.reason, path)


class FormatError(AdapterError):
    """A file breaks the adapter format or a foreign format's rules."""


class BaseMismatchError(AdapterError):
    """An adapter was made for another base model."""


class FileSystemError(AdapterError):
    """The operating system refused a read or a write, or a path cannot be used as asked."""

    #: errno -> the words users know from their shell
    WORDS = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOENT: "no such file or folder",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.EISDIR: "is a folder",
        errno.ENAMETOOLONG: "file name too long",
        errno.EEXIST: "already exists",
        errno.ENOTEMPTY: "folder is not empty",
        errno.EXDEV: "cannot rename across file systems",
        errno.EMFILE: "too many open files",
        errno.EIO: "input/output error",
        errno.ELOOP: "too many levels of symbolic links",
    }

    @classmethod
    def from_os_error(cls, exc: OSError, path: str | os.PathLike | None = None) -> "FileSystemError":
        """One line for an OSError: the path it names (or ``path``) and what went wrong, in plain words."""
        where = exc.filename if exc.filename is not None else path
        words = cls.WORDS.get(exc.errno) or exc.strerror or (str(exc).splitlines() or [""])[0]
        return cls(words[0].lower() + words[1:] if words else type(exc).__name__, where)


class RequestError(AdapterError):
    """The request cannot be done: a bad value, an operation a kind does not support, a non-finite result."""


class HubError(AdapterError):
    """The Hugging Face Hub refused, failed or did not answer."""
