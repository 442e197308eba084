"""The one output discipline: every command that writes a file or a folder writes it through :func:`output`.

    with output("merged/", inputs=[base, adapter], folder=True, overwrite=False, owned=["adapterkit_merge.json"]) as tmp:
        ...write everything into tmp...
    # renamed into place; on any failure (or SIGTERM, SIGHUP, SIGINT) tmp is gone and the old output is intact

What it guarantees, in order:

1. **No input is touched.** An output that is, contains or lies inside any input (after resolving symbolic links,
   and hard links for existing files) is refused, with or without ``overwrite``.
2. **One writer per output.** The output is claimed with an exclusive lock on ``.<name>.adapterkit-lock`` beside it
   (``flock``: released by the kernel however the process ends). A second writer is refused, saying so.
3. **Nothing half-written.** Everything is written into ``.<name>.<pid>.adapterkit-tmp`` beside the output (so the
   final rename stays on one file system) and renamed into place only when complete. A folder that is replaced is
   first moved aside (``.adapterkit-old``), then removed. Temporaries that a killed process (kill -9) left are
   recognised by their names and removed by the next run on that output, which holds the lock; an output moved aside
   and never replaced is put back.
4. **Signals clean up.** While an output is being written, SIGTERM and SIGHUP raise :class:`Terminated` in the main
   thread, as SIGINT raises KeyboardInterrupt, so the temporary is removed on the way out.
5. **Permissions** are those the user's umask gives (0666 & ~umask for files, 0777 & ~umask for folders).
6. **Existing outputs**: a file is replaced; a folder only if it is empty, or with ``overwrite`` when it holds one of
   the ``owned`` files that mark it as written by adapterkit (so ``--overwrite`` never deletes a folder that is not
   ours, such as a home folder given by mistake); nothing that is not a regular file or folder is replaced.
7. **OS errors** (no space, read-only file system, permission denied, name too long) become one
   :class:`~adapterkit.errors.FileSystemError` naming the output.

Fault injection: with ``ADAPTERKIT_FAULT_PAUSE_BEFORE_COMMIT=<seconds>`` in the environment, a writer sleeps after
writing everything and before the rename, so tests can kill it there (as SQLite's tests inject faults).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from adapterkit.errors import FileSystemError
from adapterkit.io.paths import describe_non_regular

log = logging.getLogger(__name__)

TEMPORARY = ".adapterkit-tmp"
MOVED_ASIDE = ".adapterkit-old"
LOCK = ".adapterkit-lock"
PAUSE_VARIABLE = "ADAPTERKIT_FAULT_PAUSE_BEFORE_COMMIT"
#: names longer than this are shortened in the names of temporaries (NAME_MAX is 255 on most file systems)
LONGEST_STEM = 120


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP while writing an output (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def write_file_atomically(path: str | os.PathLike, write: Callable[[str], None], *, inputs: Iterable = (),
                          sync: bool = False) -> None:
    """Call ``write(temporary_path)`` to create the file, then rename it into place (see :func:`output`)."""
    with output(path, inputs=inputs, sync=sync) as tmp:
        write(os.fspath(tmp))


@contextlib.contextmanager
def output(path: str | os.PathLike, *, inputs: Iterable = (), folder: bool = False, overwrite: bool = False,
           owned: Iterable[str] = (), only: Iterable[str] | None = None, sync: bool = False) -> Iterator[Path]:
    """A temporary file path (or an empty temporary folder, with ``folder``) to write ``path``'s content into; it is
    renamed into place when the block ends without an error. See the module docstring for the guarantees. ``sync``
    flushes a file to stable storage before the rename (for small, precious outputs such as trained adapters).
    ``only``, for a folder in a format others write too (PEFT's), names every file an existing folder may hold to be
    replaced: a folder with anything else in it is not ours."""
    path = Path(os.path.abspath(os.fspath(path)))
    refuse_overlap(path, inputs)
    try:
        _make_parent(path)
        with _claim(path):
            _check_existing(path, folder, overwrite, tuple(owned), None if only is None else set(only))
            tmp = path.with_name(f".{_stem(path)}.{os.getpid()}{TEMPORARY}")
            _remove(tmp)
            try:
                with _signals_raise():
                    if folder:
                        os.mkdir(tmp, 0o777)
                    yield tmp
                    _pause_for_fault_injection()
                    if sync and not folder:
                        _fsync(tmp)
                    _commit(tmp, path, folder)
                    if sync:
                        _fsync(path.parent)
            except BaseException:
                _remove(tmp)
                raise
    except OSError as exc:
        raise _explained(exc, path) from None


def _make_parent(path: Path) -> None:
    """Create the output's folder; refuse, before any work, a parent that is a file and a name too long."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir(exist_ok=True) says so when the parent exists and is not a folder
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(path.parent)) from None
    try:
        longest = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):  # the file system does not say: the rename will tell
        return
    if len(os.fsencode(path.name)) > longest:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), os.fspath(path))


def refuse_overlap(path: str | os.PathLike, inputs: Iterable) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (paths; others are ignored)."""
    out = _real(path)
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)) or os.fspath(given).startswith("hf://"):
            continue
        real = _real(given)
        if out == real or _same_file(path, given):
            raise FileSystemError(f"is also an input ({os.fspath(given)}): refusing to write over an input", path)
        if _inside(out, real):
            raise FileSystemError(f"lies inside the input {os.fspath(given)}: refusing to write into an input", path)
        if _inside(real, out):
            raise FileSystemError(f"contains the input {os.fspath(given)}: refusing to replace it", path)


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _stem(path: Path) -> str:
    name = path.name
    if len(name) <= LONGEST_STEM:
        return name
    return name[:LONGEST_STEM - 13] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _claim(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``path``; clean up what a killed writer left behind."""
    lock_path = path.with_name(f".{_stem(path)}{LOCK}")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileSystemError("another adapterkit process is writing this output right now; wait for it to "
                                  "finish or choose another output", path) from None
        try:
            still_there = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            still_there = False
        if still_there:  # else a writer that just finished removed the file we locked: take the new one
            break
        os.close(fd)
    try:
        _clean_leftovers(path)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _clean_leftovers(path: Path) -> None:
    """Remove temporaries a killed writer left (we hold the lock: no writer is alive); put back an output that was
    moved aside and never replaced."""
    stem = _stem(path)
    for leftover in path.parent.glob(f".{glob_escape(stem)}.*"):
        suffix = leftover.name[len(stem) + 1:]
        if not re.fullmatch(rf"\.\d+({re.escape(TEMPORARY)}|{re.escape(MOVED_ASIDE)})", suffix):
            continue  # another output's (".model.v2.<pid>.adapterkit-tmp" is not the output "model"'s)
        if suffix.endswith(TEMPORARY):
            log.warning("removing %s, left by an adapterkit process that did not finish", leftover)
            _remove(leftover)
        elif suffix.endswith(MOVED_ASIDE):
            if not os.path.lexists(path):
                log.warning("putting back %s, moved aside by an adapterkit process that did not finish", path)
                os.rename(leftover, path)
            else:
                _remove(leftover)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _check_existing(path: Path, folder: bool, overwrite: bool, owned: tuple[str, ...], only: set[str] | None) -> None:
    if not os.path.lexists(path):
        return
    if path.is_symlink() and not path.exists():
        raise FileSystemError("is a broken symbolic link: remove it or choose another output", path)
    mode = os.stat(path).st_mode
    is_folder = describe_non_regular(mode) == "a folder"
    if not is_folder and describe_non_regular(mode) is not None:
        raise FileSystemError(f"exists and is {describe_non_regular(mode)}: refusing to replace it", path)
    if folder and not is_folder:
        raise FileSystemError("exists and is a file, not a folder: refusing to replace it", path)
    if not folder:
        if is_folder:
            raise FileSystemError("is a folder: give a file name", path)
        return
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise FileSystemError("exists and is not an empty folder (use --overwrite to replace it)", path)
    foreign = only is not None and any(entry.name not in only for entry in path.iterdir())
    if foreign or (owned and not any((path / name).exists() for name in owned)):
        why = "it holds other files" if foreign else f"it holds no {' or '.join(owned)}"
        raise FileSystemError(f"is a folder adapterkit did not write ({why}): refusing to replace it, even with "
                              "--overwrite; remove it yourself or choose another output", path)


def _commit(tmp: Path, path: Path, folder: bool) -> None:
    """Rename ``tmp`` into place, with termination signals held (so a folder is never left moved aside between its
    two renames by a SIGTERM; kill -9 there is repaired by the next run, see :func:`_clean_leftovers`)."""
    if folder:
        _apply_umask(tmp)
    held = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        _rename_into_place(tmp, path, folder)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _apply_umask(folder: Path) -> None:
    """Give everything in ``folder`` the permissions the user's umask gives (libraries that write into it, such as
    safetensors' writer under ``save_pretrained``, may create their files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for root, folders, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, 0o666 & ~mask)


def _rename_into_place(tmp: Path, path: Path, folder: bool) -> None:
    if not folder:
        if path.is_symlink():
            path.unlink()  # replace the link itself, never what it points to
        os.replace(tmp, path)
        return
    if os.path.lexists(path) and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    aside = path.with_name(f".{_stem(path)}.{os.getpid()}{MOVED_ASIDE}")
    os.rename(path, aside)
    os.rename(tmp, path)
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause_for_fault_injection() -> None:
    pause = os.environ.get(PAUSE_VARIABLE)
    if pause:
        time.sleep(float(pause))


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` while the block runs (main thread only: signal handlers can only
    be set there; elsewhere they keep their handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _explained(exc: OSError, path: Path) -> FileSystemError:
    """The OS error as one line naming the output (not its temporary)."""
    named = exc.filename
    if named is None or any(suffix in os.fspath(named) for suffix in (TEMPORARY, MOVED_ASIDE, LOCK)):
        exc = OSError(exc.errno, exc.strerror)
        return FileSystemError.from_os_error(exc, path)
    return FileSystemError.from_os_error(exc, named)


__all__ = ["Terminated", "output", "refuse_overlap", "write_file_atomically"]
