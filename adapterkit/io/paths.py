"""Opening input files: regular files only, never blocking, every failure one line naming the path.

A FIFO, a socket or a device given where a file is expected would hang a reader (opening a FIFO waits for a writer)
or read forever: :func:`open_regular` opens without blocking and refuses anything that is not a regular file before
reading a byte. Every OS error becomes a :class:`~adapterkit.errors.FileSystemError` naming the path.
"""

from __future__ import annotations

import os
import stat

from adapterkit.errors import FileSystemError

KINDS_OF_FILE = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                 stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def describe_non_regular(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    return KINDS_OF_FILE.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str | os.PathLike, mode: str = "rb"):
    """``open(path, mode)`` for reading, refusing (before reading anything, without blocking) whatever is not a
    regular file."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # a socket cannot be opened at all (ENXIO): say what it is, as for a FIFO
        try:
            what = describe_non_regular(os.stat(path).st_mode)
        except OSError:
            what = None
        if what is not None:
            raise FileSystemError(f"is {what}, not a regular file: refusing to read it", path) from None
        raise FileSystemError.from_os_error(exc, path) from None
    try:
        what = describe_non_regular(os.fstat(fd).st_mode)
        if what is not None:
            raise FileSystemError(f"is {what}, not a regular file: refusing to read it", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike) -> None:
    """Refuse ``path`` unless it is a regular file (or a link to one), without opening it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FileSystemError.from_os_error(exc, path) from None
    what = describe_non_regular(mode)
    if what is not None:
        raise FileSystemError(f"is {what}, not a regular file: refusing to read it", path)
