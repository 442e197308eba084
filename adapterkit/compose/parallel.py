"""Threads for a composition: its independent pieces (the LoRA math of each target, the digest of each input) run on a
pool of threads, and numpy's BLAS runs single-threaded meanwhile.

The pieces are small matrix factorisations (a QR of a [d, Σrᵢ] stack, an SVD of a Σrᵢ×Σrᵢ core): too small for BLAS's
own threads to pay, which on a loaded machine cost more than they bring, but many and independent, and numpy releases
the GIL inside LAPACK and BLAS and hashlib inside sha256. So :func:`workers` runs them on ``threads`` threads of ours
with BLAS told to use one thread each (no more threads than cores in all). BLAS is told through OpenBLAS's own
``openblas_set_num_threads`` (numpy's wheels bundle OpenBLAS), found among the libraries this process has loaded; the
setting is process-wide, so it is restored when the last composition running ends. Where no OpenBLAS is found (another
BLAS, another platform) the pieces run one after the other on the calling thread, BLAS untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_executor: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("adapterkit_compose_executor", default=None)

#: OpenBLAS's thread setters and getters, by library, in the names its builds use (plain, 64-bit-integer, scipy's)
_SUFFIXES = ("", "64_", "_64")
_PREFIXES = ("openblas", "scipy_openblas")


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _OpenBLAS:
    """The OpenBLAS libraries loaded in this process, and a counted, process-wide "one thread" setting."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved: list[tuple[Callable, int]] = []
        self._controls: list[tuple[Callable, Callable]] | None = None

    def controls(self) -> list[tuple[Callable, Callable]]:
        """(set_num_threads, get_num_threads) of each OpenBLAS loaded, found once."""
        if self._controls is None:
            self._controls = []
            for path in _loaded_libraries("openblas"):
                try:
                    # already loaded (numpy loaded it): no new library is brought in
                    library = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0))
                except OSError:
                    continue
                for prefix in _PREFIXES:
                    for suffix in _SUFFIXES:
                        setter = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
                        getter = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                        if setter is not None and getter is not None:
                            setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                            self._controls.append((setter, getter))
                            break
                    else:
                        continue
                    break
            log.debug("OpenBLAS thread controls found: %d", len(self._controls))
        return self._controls

    def acquire(self) -> bool:
        """Set every OpenBLAS to one thread (the first user saves the settings); False when there is none."""
        with self.lock:
            controls = self.controls()
            if not controls:
                return False
            if self.users == 0:
                self.saved = [(setter, getter()) for setter, getter in controls]
                for setter, _ in controls:
                    setter(1)
            self.users += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                for setter, threads in self.saved:
                    setter(threads)
                self.saved = []


_OPENBLAS = _OpenBLAS()


def _loaded_libraries(word: str) -> list[str]:
    """Paths of the shared libraries loaded in this process whose file name holds ``word`` (Linux: /proc/self/maps;
    elsewhere the libraries bundled with numpy's wheel, opened only if already loaded)."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1]
                if path.startswith("/") and word in os.path.basename(path) and path not in paths:
                    paths.append(path)
        return paths
    except OSError:
        pass
    import numpy

    root = os.path.dirname(os.path.dirname(numpy.__file__))
    for folder in (os.path.join(root, "numpy.libs"), os.path.join(os.path.dirname(numpy.__file__), ".dylibs")):
        if os.path.isdir(folder):
            paths += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if word in f]
    return paths


@contextlib.contextmanager
def workers(threads: int | None = None) -> Iterator[Executor | None]:
    """Within, numpy's BLAS runs on one thread, and :func:`map_ordered` and :func:`submit` on a pool of ``threads``
    threads (default: the CPUs available): ``threads`` in all. With ``threads`` 1 they run on the calling thread;
    so they do, BLAS untouched, where no OpenBLAS is found to tell. Yields the pool (None when there is none)."""
    threads = available_cpus() if threads is None else threads
    single = _OPENBLAS.acquire()
    try:
        if threads <= 1 or not single:
            token = _executor.set(None)
            try:
                yield None
            finally:
                _executor.reset(token)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adapterkit-compose") as executor:
            token = _executor.set(executor)
            try:
                yield executor
            finally:
                _executor.reset(token)
    finally:
        if single:
            _OPENBLAS.release()


def map_ordered(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(item) for item in items]``, on the pool of the enclosing :func:`workers` if any; the first
    exception in ``items`` order is raised."""
    executor = _executor.get()
    if executor is None:
        return [function(item) for item in items]
    return list(executor.map(function, items))


def submit(function: Callable[[], R]) -> Callable[[], R]:
    """``function`` started on the pool of the enclosing :func:`workers` (at once without one); call the result to
    get its value."""
    executor = _executor.get()
    if executor is None:
        value = function()
        return lambda: value
    future: Future = executor.submit(function)
    return future.result
