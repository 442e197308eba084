"""Fault injection: every command that writes, under the faults a real machine has (one test per class of fault,
parametrised over the commands).

- a writer killed (SIGTERM, kill -9) just before its output is renamed into place (the pause hook of
  :mod:`adapterkit.io.outputs`): no partial output, the old output intact, no temporary after SIGTERM, a temporary
  after kill -9 that the next run removes;
- no space left (a full tmpfs), a read-only file system, an output on another file system than its inputs;
- two writers on one output; outputs that are, contain or lie inside an input (also through links);
- inputs that are not regular files (a FIFO, a socket, /dev/zero); OS errors (a parent that is a file, a name too
  long); the permissions of what is written (the umask).

Every test hashes the inputs it hands to a command before and after (the ``inputs`` fixture): a command never
modifies an input, whatever happens. Mounts (tmpfs, read-only bind) need root, as CI runs; elsewhere those tests skip
with the reason. Commands run in this process (``call_cli``) unless the test needs a process to kill or a clean
umask; subprocesses run ``main()`` with a hook that tells the test when the output is complete and paused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

import tiny_models
from cli_runner import call_cli
from hub_server import HubServer
from adapterkit import load, save
from adapterkit.example import build_example
from adapterkit.io import outputs
from adapterkit.io.checkpoint import Checkpoint
from adapterkit.merge_checkpoint import RECORD_FILE, merge_checkpoint

TARGETS = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
REPO = "me/faults"
#: the child: adapterkit's main(), with the pause hook announcing (by creating a file) that the output is complete
CHILD = r"""
import os
import signal
from adapterkit.io import outputs

# Ctrl-C as in a terminal, also when the tests run in the background (where SIGINT is ignored, and inherited so)
signal.signal(signal.SIGINT, signal.default_int_handler)

announce = os.environ.get("ADAPTERKIT_TEST_PAUSED")
if announce:
    pause = outputs._pause_for_fault_injection

    def announce_then_pause():
        open(announce, "w").close()
        pause()

    outputs._pause_for_fault_injection = announce_then_pause
from adapterkit.cli import main

main()
"""


# --- what every test uses: inputs that must stay untouched, and how a refusal looks --------------------------------


def digests(path: Path) -> dict[str, tuple]:
    """sha256, size, mode and mtime of every file under ``path`` (a file or a folder), by relative name: the listing
    and the bytes of an input."""
    path = Path(path)
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*"))
    found = {}
    for file in files:
        info = file.lstat()
        key = os.fspath(file.relative_to(path)) if file != path else file.name
        if stat.S_ISREG(info.st_mode):
            found[key] = (hashlib.sha256(file.read_bytes()).hexdigest(), info.st_size, info.st_mode, info.st_mtime_ns)
        else:
            found[key] = (None, None, info.st_mode, None if stat.S_ISDIR(info.st_mode) else info.st_mtime_ns)
    return found


class Inputs:
    """Inputs registered by a test, hashed when registered and checked again when the test ends: every test of this
    suite registers every input it gives a command."""

    def __init__(self):
        self.before: dict[Path, dict] = {}

    def add(self, *paths) -> None:
        for path in paths:
            path = Path(path)
            if path.exists() and path not in self.before:
                self.before[path] = digests(path)

    def check(self) -> None:
        for path, before in self.before.items():
            assert digests(path) == before, f"input {path} was modified"


@pytest.fixture
def inputs():
    guard = Inputs()
    yield guard
    guard.check()


#: a tqdm progress bar ("train lora: 100%|####| 1/1 [...]"): train draws one on stderr even when it is no terminal,
#: and transformers draws its loading bar in this process (a subprocess turns it off before importing transformers)
PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|.*\|")


def one_line(result) -> str:
    """The one line a refusal prints (stderr; validate reports on stdout), never a traceback or an internal error;
    progress bars before it are allowed."""
    text = result.stderr if result.stderr.strip() else result.stdout
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, text
    return lines[0]


def assert_refused(result, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    line = one_line(result)
    assert line.startswith(("error: ", "invalid: ")), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def listing(folder: Path) -> set[str]:
    return {p.name for p in Path(folder).iterdir()} if Path(folder).exists() else set()


# --- the materials: a tiny Llama, two LoRAs for it, a merged folder, the built-in example (train data) -------------


@pytest.fixture(scope="module")
def world(tiny_llama_dir, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("faults-inputs")
    model = tiny_models.llama()
    save(tiny_models.random_lora(model, TARGETS, seed=1), root / "a.safetensors")
    save(tiny_models.random_lora(model, TARGETS, seed=2, rank=2), root / "b.safetensors")
    merge_checkpoint(tiny_llama_dir, [root / "a.safetensors"], root / "merged")
    example = build_example(root / "example")
    return SimpleNamespace(base=Path(tiny_llama_dir), a=root / "a.safetensors", b=root / "b.safetensors",
                           merged=root / "merged", train_base=example["llama"], data=example["support_formal"])


@dataclass
class Writer:
    """A command that writes an output: its arguments for an output path, its inputs, and what its output is."""

    args: Callable[[SimpleNamespace, Path], list]
    inputs: Callable[[SimpleNamespace], list]
    folder: bool = False
    marker: str | None = None  #: the file that marks a folder output as written by adapterkit

    def output(self, where: Path) -> Path:
        return where / ("out" if self.folder else "out.safetensors")


WRITERS = {
    "merge": Writer(lambda w, out: ["merge", w.base, w.a, "-o", out, "--overwrite"], lambda w: [w.base, w.a],
                    folder=True, marker=RECORD_FILE),
    "unmerge": Writer(lambda w, out: ["unmerge", w.merged, w.a, "-o", out, "--overwrite"],
                      lambda w: [w.merged, w.a], folder=True, marker=RECORD_FILE),
    "compose": Writer(lambda w, out: ["compose", w.a, w.b, "-o", out], lambda w: [w.a, w.b]),
    "export": Writer(lambda w, out: ["export", "--onnx", w.base, w.a, "--unmerged", "-o", out, "--overwrite"],
                     lambda w: [w.base, w.a], folder=True, marker="adapterkit.json"),
    "convert": Writer(lambda w, out: ["convert", w.a, "--to", "peft", "-o", out, "--overwrite"], lambda w: [w.a],
                      folder=True,
                      marker="adapter_config.json"),
    "train": Writer(lambda w, out: ["train", w.train_base, "--data", w.data, "--steps", 1, "--batch-size", 2,
                                    "-o", out], lambda w: [w.train_base, w.data]),
    "pull": Writer(lambda w, out: ["pull", REPO, "-o", out], lambda w: []),
}


def check_output(command: str, out: Path) -> None:
    """The output of a finished run is whole: an adapter that loads, a model folder whose tensors are finite, ..."""
    if command in ("merge", "unmerge"):
        with Checkpoint(out) as checkpoint:
            assert all(np.isfinite(checkpoint.get(n)).all() for n in checkpoint.names())
        assert json.loads((out / RECORD_FILE).read_text())["merged"] is not None
    elif command == "export":
        assert (out / "model.onnx").stat().st_size > 0
        assert json.loads((out / "adapterkit.json").read_text())["mode"] == "unmerged"
    elif command == "convert":
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    else:
        adapter = load(out)
        assert all(np.isfinite(t).all() for t in adapter.tensors.values())


def write_old_output(writer: Writer, out: Path) -> dict:
    """An output from an earlier run (a folder holding the marker, or a file): what a failed run must leave intact."""
    if writer.folder:
        out.mkdir(parents=True)
        (out / writer.marker).write_text('{"merged": [], "old": true}\n')
        (out / "old.bin").write_bytes(os.urandom(1000))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"an output of an earlier run\n" * 100)
    return digests(out)


# --- subprocesses: the real entry point, a pause before the commit, signals ----------------------------------------


def child_environment(extra: dict | None = None) -> dict:
    dropped = (outputs.PAUSE_VARIABLE, "ADAPTERKIT_TEST_PAUSED", "HF_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update({k: os.fspath(v) for k, v in (extra or {}).items()})
    return env


class Paused:
    """A child process running ``adapterkit ARGS``, its stderr in a file (a full pipe would block it)."""

    def __init__(self, args, env: dict, folder: Path, pause: float):
        self.announce, self.log = folder / "paused", folder / "child.stderr"
        env = {**env, outputs.PAUSE_VARIABLE: str(pause), "ADAPTERKIT_TEST_PAUSED": os.fspath(self.announce)}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], env=env,
                                            stdout=subprocess.DEVNULL, stderr=log)
        self.pid = self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the end: (exit status, stderr)."""
        return self.process.wait(timeout), self.log.read_text()


@contextlib.contextmanager
def paused_writer(args, env: dict, folder: Path, pause: float = 120, timeout: float = 180):
    """Start ``adapterkit ARGS`` with the pause hook and yield it once its output is complete and paused before the
    rename; killed on the way out if still running."""
    child = Paused(args, env, folder, pause)
    try:
        deadline = time.monotonic() + timeout
        while not child.announce.exists():
            if not child.running():
                pytest.fail(f"the command ended (status {child.process.returncode}) before its pause:\n"
                            f"{child.log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("the command never reached its pause before the commit")
            time.sleep(0.05)
        yield child
    finally:
        if child.running():
            child.process.kill()
            child.process.wait()


def run_child(args, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def serving(adapter: Path, home: Path):
    """A loopback Hub holding ``adapter`` in REPO (with the record ``push`` writes); yields the environment a child
    process needs to use it."""
    data = adapter.read_bytes()
    record = {"format": "adapterkit", "file": "adapter.safetensors", "sha256": hashlib.sha256(data).hexdigest(),
              "size": len(data), "format_version": "1.0"}
    with HubServer() as server:
        server.seed(REPO, {"adapter.safetensors": data, "adapterkit.json": json.dumps(record).encode()})
        yield {"HF_ENDPOINT": server.url, "HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}


@pytest.fixture
def loopback_hub(world, tmp_path):
    with serving(world.a, tmp_path / "hf") as env:
        yield env


# === killed in the middle =============================================================================================


KILLS = [pytest.param(command, signum, existed, id=f"{command}-{name}-{'over-an-old-output' if existed else 'new'}")
         for command in ["merge", "compose", "export", "train", "pull"]
         for signum, name in [(signal.SIGTERM, "SIGTERM"), (signal.SIGKILL, "kill-9")]
         for existed in [False, True]
         # export and train take seconds to start: each signal once, with the old output for SIGTERM only
         if command not in ("export", "train") or existed == (signum == signal.SIGTERM)]


@pytest.mark.parametrize("command, signum, existed", KILLS)
def test_a_writer_killed_before_its_commit_leaves_no_partial_output(command, signum, existed, world, inputs,
                                                                    tmp_path, request):
    """Killed while its complete temporary waits for the rename: SIGTERM exits 143 and removes the temporary; kill -9
    leaves it (and the lock file), and the next run on that output removes them and succeeds. An output that existed
    before is intact byte for byte; one that did not is still absent."""
    writer = WRITERS[command]
    env = child_environment(request.getfixturevalue("loopback_hub") if command == "pull" else None)
    inputs.add(*writer.inputs(world))
    where = tmp_path / "outputs"
    where.mkdir()
    out = writer.output(where)
    old = write_old_output(writer, out) if existed else None
    with paused_writer(writer.args(world, out), env, tmp_path) as child:
        temporary = f".{out.name}.{child.pid}{outputs.TEMPORARY}"
        assert temporary in listing(where)  # killed while its output is complete but not in place
        child.process.send_signal(signum)
        status, err = child.finish(timeout=60)
    if existed:
        assert digests(out) == old
    else:
        assert not os.path.lexists(out)
    if signum == signal.SIGTERM:
        assert status == 128 + signal.SIGTERM, err
        assert one_line(SimpleNamespace(stdout="", stderr=err)) == ("error: terminated by SIGTERM: stopped, "
                                                                    "temporary files removed")
        assert listing(where) == ({out.name} if existed else set())  # no temporary, no lock file
        return
    assert status == -signal.SIGKILL
    assert temporary in listing(where)
    again = run_child(writer.args(world, out), env) if command == "pull" else call_cli(*writer.args(world, out))
    assert again.returncode == 0, again.stderr
    assert listing(where) == {out.name}  # the leftover removed; no lock file after a normal run
    check_output(command, out)


@pytest.mark.parametrize("signum, words", [(signal.SIGHUP, "terminated by SIGHUP"), (signal.SIGINT, "interrupted")],
                         ids=["SIGHUP", "SIGINT"])
@pytest.mark.parametrize("command", ["compose", "merge"])
def test_a_hangup_or_an_interrupt_before_the_commit_removes_the_temporary(command, signum, words, world, inputs,
                                                                          tmp_path):
    """SIGHUP (a closed terminal) exits 129 and Ctrl-C 130, with the temporary removed and the old output intact."""
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    where = tmp_path / "outputs"
    out = writer.output(where)
    old = write_old_output(writer, out)
    with paused_writer(writer.args(world, out), child_environment(), tmp_path) as child:
        child.process.send_signal(signum)
        status, err = child.finish(timeout=60)
    assert status == 128 + signum, err
    assert one_line(SimpleNamespace(stdout="", stderr=err)).startswith(f"error: {words}")
    assert listing(where) == {out.name}
    assert digests(out) == old


# === no space left on the device ======================================================================================


def mount(*args) -> None:
    """Run mount(8), or skip the test saying why (not root, no mount in this container, ...)."""
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not installed: cannot make a small or read-only file system")
    done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (needs root, as CI runs): mount {' '.join(map(str, args))}: "
                    f"{done.stderr.strip()}")


def unmount(where: Path) -> None:
    if subprocess.run(["umount", os.fspath(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", os.fspath(where)], capture_output=True)


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 256 KiB tmpfs filled up to its last page: every output is larger than the room left."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mount("-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", where)
    try:
        room = os.statvfs(where)
        (where / "filler").write_bytes(b"\0" * (room.f_bavail * room.f_frsize - 4096))
        room = os.statvfs(where)
        assert 0 < room.f_bavail * room.f_frsize <= 4096
        yield where
    finally:
        unmount(where)


@pytest.mark.parametrize("command", ["merge", "unmerge", "compose", "export", "convert", "train"])
def test_no_space_left_is_one_line_naming_the_output_and_leaves_nothing(command, world, inputs, full_tmpfs):
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    out = writer.output(full_tmpfs)
    refused = call_cli(*writer.args(world, out))
    assert_refused(refused, f"{out}: no space left on the device")
    assert listing(full_tmpfs) == {"filler"}  # no partial output, temporary or lock file


# === a read-only file system ==========================================================================================


@pytest.fixture
def read_only(tmp_path):
    """A read-only bind mount of an empty folder."""
    source, where = tmp_path / "ro-source", tmp_path / "read-only"
    source.mkdir()
    where.mkdir()
    mount("--bind", source, where)
    try:
        mount("-o", "remount,ro,bind", where)
        yield where
    finally:
        unmount(where)


@pytest.mark.parametrize("inside", [False, True], ids=["in-it", "in-a-new-subfolder"])
@pytest.mark.parametrize("command", ["merge", "compose", "export", "convert", "train"])
def test_a_read_only_file_system_is_one_line(command, inside, world, inputs, read_only):
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    out = writer.output(read_only / "sub" if inside else read_only)
    refused = call_cli(*writer.args(world, out))
    assert_refused(refused, f"{out.parent if inside else out}: read-only file system")
    assert listing(read_only) == set()


# === an output on another file system than its inputs =================================================================


@pytest.fixture
def other_file_system(tmp_path):
    """A folder on another file system than tmp_path (/dev/shm is a tmpfs)."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is missing or on the same file system as the tests' temporary folder")
    where = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="adapterkit-faults-"))
    yield where
    shutil.rmtree(where, ignore_errors=True)


def same_bytes(one: Path, other: Path) -> None:
    assert listing(one) == listing(other)
    for name in listing(one):
        assert (one / name).read_bytes() == (other / name).read_bytes(), name


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_an_output_on_another_file_system_is_the_same_byte_for_byte(command, world, inputs, tmp_path,
                                                                    other_file_system):
    """Unchanged tensors are copied by the kernel (copy_file_range), which cannot cross file systems everywhere: the
    plain copy it falls back to gives the same bytes."""
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    here, there = tmp_path / "here", other_file_system / "there"
    assert call_cli(*writer.args(world, here)).returncode == 0
    done = call_cli(*writer.args(world, there))
    assert done.returncode == 0, done.stderr
    same_bytes(here, there)
    assert listing(other_file_system) == {"there"}


@pytest.mark.parametrize("failure", ["EXDEV", "ENOSYS", "EINVAL", "copies-nothing", "missing", "EIO"])
def test_kernel_copy_failures_fall_back_or_are_one_line(failure, world, inputs, tmp_path, monkeypatch):
    """copy_file_range failing as on another file system (EXDEV), an old kernel (ENOSYS), a file system without it
    (EINVAL), copying nothing without an error (as for files of some file systems), or a Python without it: the same
    bytes by a plain copy. A real I/O error (EIO): one line, nothing written."""
    writer = WRITERS["merge"]
    inputs.add(*writer.inputs(world))
    reference = tmp_path / "reference"
    assert call_cli(*writer.args(world, reference)).returncode == 0
    calls = []
    if failure == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        def failing(*args, **kwargs):
            calls.append(args)
            if failure == "copies-nothing":
                return 0
            raise OSError(getattr(errno, failure), os.strerror(getattr(errno, failure)))

        monkeypatch.setattr(os, "copy_file_range", failing)
    out = tmp_path / "outputs" / "out"
    result = call_cli(*writer.args(world, out))
    assert failure == "missing" or calls  # the kernel copy was tried
    if failure == "EIO":
        assert_refused(result, f"{out}: input/output error")
        assert listing(out.parent) == set()
        return
    assert result.returncode == 0, result.stderr
    same_bytes(reference, out)


# === two writers on one output ========================================================================================


@pytest.mark.parametrize("command", ["merge", "compose"])
def test_a_second_writer_on_the_same_output_is_refused_and_the_first_completes(command, world, inputs, tmp_path):
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    out = writer.output(tmp_path / "outputs")
    with paused_writer(writer.args(world, out), child_environment(), tmp_path, pause=6) as first:
        second = call_cli(*writer.args(world, out))
        assert first.running()  # the first was still writing when the second was refused
        assert_refused(second, f"{out}: another adapterkit process is writing this output")
        status, err = first.finish()
    assert status == 0, err
    check_output(command, out)
    assert listing(out.parent) == {out.name}


def test_writers_of_outputs_whose_names_share_a_prefix_leave_each_other_alone(world, inputs, tmp_path):
    """The writer of "model" cleans up what killed writers of "model" left, never the live temporary of a writer of
    "model.v2" beside it."""
    inputs.add(world.a, world.b)
    where = tmp_path / "outputs"
    with paused_writer(["compose", world.a, world.b, "-o", where / "model.v2"], child_environment(), tmp_path,
                       pause=6) as first:
        second = call_cli("compose", world.a, world.b, "-o", where / "model")
        assert first.running()
        assert second.returncode == 0, second.stderr
        status, err = first.finish()
    assert status == 0, err
    assert listing(where) == {"model", "model.v2"}
    check_output("compose", where / "model.v2")


NAMES = {"brackets": "out[1].safetensors", "glob": "o*?.safetensors", "newline": "new\nline.safetensors",
         "long": "x" * 240 + ".safetensors", "dash": "-o.safetensors", "unicode": "ü ñ.safetensors"}


@pytest.mark.parametrize("name", NAMES)
def test_leftovers_of_a_killed_writer_are_found_whatever_the_output_name(name, world, inputs, tmp_path):
    """Glob characters, a newline, a name too long to keep whole in the temporary's name (shortened with a hash)."""
    inputs.add(world.a, world.b)
    where = tmp_path / "outputs"
    out = where / NAMES[name]
    with paused_writer(["compose", world.a, world.b, "-o", out], child_environment(), tmp_path) as child:
        child.process.kill()
        child.process.wait()
    assert len(listing(where)) == 2  # the temporary and the lock file
    again = call_cli("compose", world.a, world.b, "-o", out)
    assert again.returncode == 0, again.stderr
    assert listing(where) == {out.name}
    check_output("compose", out)


# === outputs that are, contain or lie inside an input =================================================================


def overlap_case(name: str, tmp: Path, w: SimpleNamespace) -> tuple[list, list, str]:
    """(arguments, the inputs at stake, the words of the refusal) for one way of aiming an output at an input. Inputs
    are copies in ``tmp``, and folders hold the marker of an adapterkit output, so that --overwrite would replace them
    if the overlap were not seen."""
    models, adapters = tmp / "models", tmp / "adapters"
    if not models.exists():
        merge_checkpoint(w.base, [w.a], models / "base")  # a merged folder is a base, and holds a merge record
        (models / RECORD_FILE).write_text('{"merged": []}\n')
        (models / "adapterkit.json").write_text("{}\n")
        (models / "base" / "adapterkit.json").write_text("{}\n")
        adapters.mkdir()
        shutil.copy(w.a, adapters / "a.safetensors")
        shutil.copy(w.b, adapters / "b.safetensors")
        (adapters / RECORD_FILE).write_text('{"merged": []}\n')
        (adapters / "adapter_config.json").write_text("{}\n")
        shutil.copy(w.data, tmp / "data.jsonl")
        shutil.copytree(w.train_base, tmp / "llama")
        (tmp / "link-to-a.safetensors").symlink_to(adapters / "a.safetensors")
        os.link(adapters / "a.safetensors", tmp / "hard-link-to-a.safetensors")
        (tmp / "link-to-adapters").symlink_to(adapters)
        (tmp / "link-to-base").symlink_to(models / "base")
    base, a, b, llama = models / "base", adapters / "a.safetensors", adapters / "b.safetensors", tmp / "llama"
    cases = {
        "merge -o BASE": (["merge", base, a, "-o", base, "--overwrite"], "is also an input"),
        "merge -o PARENT_OF_BASE": (["merge", base, a, "-o", models, "--overwrite"], "contains the input"),
        "merge -o BASE/sub": (["merge", base, a, "-o", base / "sub"], "lies inside the input"),
        "merge -o link_to_BASE": (["merge", base, a, "-o", tmp / "link-to-base", "--overwrite"], "is also an input"),
        "merge -o folder_of_adapter": (["merge", base, a, "-o", adapters, "--overwrite"], "contains the input"),
        "unmerge -o MERGED": (["unmerge", base, a, "-o", base, "--overwrite"], "is also an input"),
        "compose a b -o a": (["compose", a, b, "-o", a], "is also an input"),
        "compose a b -o link_to_a": (["compose", a, b, "-o", tmp / "link-to-a.safetensors"], "is also an input"),
        "compose a b -o hard_link_to_a": (["compose", a, b, "-o", tmp / "hard-link-to-a.safetensors"],
                                          "is also an input"),
        "compose a b -o linked_folder/a": (["compose", a, b, "-o", tmp / "link-to-adapters" / "a.safetensors"],
                                           "is also an input"),
        "export -o BASE": (["export", "--onnx", base, a, "--unmerged", "-o", base, "--overwrite"],
                           "is also an input"),
        "export -o BASE/sub": (["export", "--onnx", base, a, "--unmerged", "-o", base / "onnx"],
                               "lies inside the input"),
        "convert -o folder_of_a": (["convert", a, "--to", "peft", "-o", adapters], "contains the input"),
        "train -o DATA": (["train", llama, "--data", tmp / "data.jsonl", "--steps", 1, "-o", tmp / "data.jsonl"],
                          "is also an input"),
        "train -o BASE/adapter": (["train", llama, "--data", tmp / "data.jsonl", "--steps", 1, "-o",
                                   llama / "adapter.safetensors"], "lies inside the input"),
    }
    assert list(cases) == OVERLAPS
    args, words = cases[name]
    return args, [models, adapters, tmp / "data.jsonl", llama], words


OVERLAPS = ["merge -o BASE", "merge -o PARENT_OF_BASE", "merge -o BASE/sub", "merge -o link_to_BASE",
            "merge -o folder_of_adapter", "unmerge -o MERGED", "compose a b -o a", "compose a b -o link_to_a",
            "compose a b -o hard_link_to_a", "compose a b -o linked_folder/a", "export -o BASE", "export -o BASE/sub",
            "convert -o folder_of_a", "train -o DATA", "train -o BASE/adapter"]


@pytest.mark.parametrize("case", OVERLAPS)
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(case, world, inputs, tmp_path):
    args, at_stake, words = overlap_case(case, tmp_path, world)
    inputs.add(*at_stake)
    assert_refused(call_cli(*args), words)


@pytest.mark.parametrize("command", ["merge", "export", "convert"])
def test_overwrite_never_replaces_a_folder_adapterkit_did_not_write(command, world, inputs, tmp_path, request):
    """A non-empty folder without adapterkit's marker (a home folder given by mistake) is refused, --overwrite or
    not. For convert (no --overwrite: it replaces its own PEFT folders) the folder holds a PEFT config of its own."""
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    if command == "convert":
        (foreign / "adapter_config.json").write_text('{"peft_type": "LORA"}\n')
        (foreign / "optimizer.pt").write_bytes(b"weeks of training")
    before = digests(foreign)
    result = call_cli(*writer.args(world, foreign))
    assert digests(foreign) == before
    assert_refused(result, f"{foreign}: is a folder adapterkit did not write")


# === inputs that are not regular files ================================================================================


@pytest.fixture(params=["fifo", "socket", "/dev/zero"])
def non_regular(request, tmp_path):
    if request.param == "/dev/zero":
        yield Path("/dev/zero"), "a character device"
        return
    path = tmp_path / f"{request.param}.jsonl"  # train reads .jsonl or .csv only
    if request.param == "fifo":
        os.mkfifo(path)
        yield path, "a FIFO (named pipe)"
        return
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(path))
    server.listen(1)
    try:
        yield path, "a socket"
    finally:
        server.close()


def non_regular_args(command: str, world, path: Path, out: Path) -> list:
    return {"validate": ["validate", path], "inspect": ["inspect", path],
            "compose": ["compose", world.a, path, "-o", out],
            "merge": ["merge", world.base, path, "-o", out],
            "train": ["train", world.train_base, "--data", path, "--steps", 1, "-o", out]}[command]


@pytest.mark.parametrize("command", ["validate", "inspect", "compose"])
def test_a_non_regular_input_is_refused_without_blocking(command, non_regular, world, inputs, tmp_path):
    """In a subprocess with a timeout: a reader that opened a FIFO would wait for a writer forever, one that read
    /dev/zero would never reach its end."""
    path, what = non_regular
    inputs.add(world.a, world.base, world.train_base)
    out = tmp_path / "outputs" / "out.safetensors"
    result = run_child(non_regular_args(command, world, path, out), child_environment(), timeout=60)
    assert_refused(result, f"{path}: is {what}, not a regular file")
    assert not out.parent.exists()


class Alarm(BaseException):
    """Raised by SIGALRM: a BaseException, so that main() does not report it as an internal error."""


@pytest.mark.parametrize("command", ["merge", "train"])
def test_a_non_regular_input_to_a_torch_command_is_refused_without_blocking(command, non_regular, world, inputs,
                                                                            tmp_path):
    """The same for the commands that import torch (seconds to start a subprocess), in this process with a 60 s
    alarm that interrupts a blocking open or an endless read."""
    path, what = non_regular
    inputs.add(world.a, world.base, world.train_base)
    out = tmp_path / "outputs" / "out"
    if command == "train" and path.suffix != ".jsonl":  # train reads .jsonl or .csv only: /dev/zero by a link
        (tmp_path / "zero.jsonl").symlink_to(path)
        path = tmp_path / "zero.jsonl"

    def ring(signum, frame):
        raise Alarm

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    try:
        result = call_cli(*non_regular_args(command, world, path, out))
    except Alarm:
        pytest.fail(f"{command} blocked on {what} for 60 s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert_refused(result, f"{path}: is {what}, not a regular file")
    assert not out.parent.exists()


# === OS errors: one line naming the path, never an internal error =====================================================


@pytest.mark.parametrize("command", ["merge", "compose", "export", "convert", "train"])
@pytest.mark.parametrize("fault", ["parent is a file", "folder above is a file", "name too long",
                                   "output is a FIFO", "output is a broken link"])
def test_os_errors_are_one_line(fault, command, world, inputs, tmp_path):
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    (tmp_path / "file.txt").write_text("a file\n")
    name = writer.output(tmp_path).name
    if fault == "parent is a file":
        out, words = tmp_path / "file.txt" / name, f"{tmp_path / 'file.txt'}: a part of the path is not a folder"
    elif fault == "folder above is a file":
        out, words = tmp_path / "file.txt" / "sub" / name, "a part of the path is not a folder"
    elif fault == "name too long":
        out, words = tmp_path / ("n" * 300 + name), "file name too long"
    elif fault == "output is a FIFO":
        out, words = tmp_path / name, "exists and is a FIFO"
        os.mkfifo(out)
    else:
        out, words = tmp_path / name, "is a broken symbolic link"
        out.symlink_to(tmp_path / "nowhere")
    before = listing(tmp_path)
    result = call_cli(*writer.args(world, out))
    assert_refused(result, words)
    assert listing(tmp_path) == before  # no temporary, no lock file


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission: the case cannot "
                                              "happen as root (CI runs as root)")
@pytest.mark.parametrize("command", ["merge", "compose"])
def test_permission_denied_is_one_line(command, world, inputs, tmp_path):
    writer = WRITERS[command]
    inputs.add(*writer.inputs(world))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_refused(call_cli(*writer.args(world, writer.output(locked))), "permission denied")
    finally:
        locked.chmod(0o700)


# === permissions: what the umask says =================================================================================

UMASK_DRIVER = r"""
import json, os, sys
from adapterkit.cli import main

codes = {}
for umask, runs in json.loads(sys.argv[1]):
    os.umask(umask)
    for name, args in runs.items():
        try:
            main(args)
            codes[f"{umask:03o} {name}"] = 0
        except SystemExit as exc:
            codes[f"{umask:03o} {name}"] = exc.code
print(json.dumps(codes))
"""
UMASK_COMMANDS = ["merge", "unmerge", "compose", "convert", "export", "train", "pull", "example"]
UMASKS = [0o022, 0o077]


@pytest.fixture(scope="module")
def umask_outputs(world, tmp_path_factory):
    """Every writing command run with each umask, in one subprocess (torch imported once) that sets its umask before
    each: (folder, {"<umask> <command>": exit status})."""
    root = tmp_path_factory.mktemp("umask")
    plan = []
    for umask in UMASKS:
        where = root / f"{umask:03o}"
        runs = {name: [str(a) for a in WRITERS[name].args(world, WRITERS[name].output(where / name))]
                for name in UMASK_COMMANDS if name != "example"}
        runs["example"] = ["example", "-o", os.fspath(where / "example" / "out")]
        plan.append([umask, runs])
    guard = Inputs()
    guard.add(world.base, world.merged, world.a, world.b, world.train_base, world.data)
    with serving(world.a, root / "hf") as hub:
        done = subprocess.run([sys.executable, "-c", UMASK_DRIVER, json.dumps(plan)], env=child_environment(hub),
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    guard.check()
    return root, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", UMASK_COMMANDS)
@pytest.mark.parametrize("umask", UMASKS, ids=["umask-022", "umask-077"])
def test_outputs_follow_the_umask(umask, command, umask_outputs, request):
    """Files 0666 & ~umask, folders 0777 & ~umask, inside folders too (a merged folder, ONNX's adapters/)."""
    root, codes = umask_outputs
    assert codes[f"{umask:03o} {command}"] == 0
    out = root / f"{umask:03o}" / command
    top = out / "out" if command == "example" else WRITERS[command].output(out)
    for path in [top, *(top.rglob("*") if top.is_dir() else [])]:
        mode, expected = stat.S_IMODE(path.lstat().st_mode), (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == expected, f"{path.relative_to(root)} has mode {mode:o}; umask {umask:03o} gives {expected:o}"
    assert listing(out) == {top.name}  # no temporary, no lock file


# === bad values and bad files: refused, and nothing written =======================================================


BAD_OPTIONS = [
    ["merge", "{base}", "{a}", "--weights", "nan"],
    ["merge", "{base}", "{a}", "--weights", "1e309"],
    ["merge", "{base}", "{a}", "--weights", "0.5,0.5"],
    ["compose", "{a}", "{b}", "--weights", "inf,1"],
    ["compose", "{a}", "{b}", "--method", "ties", "--density", "0"],
    ["compose", "{a}", "{b}", "--method", "svd", "--tol", "1"],
    ["train", "{train_base}", "--data", "{data}", "--steps", "0"],
    ["train", "{train_base}", "--data", "{data}", "--epochs", "0"],
    ["train", "{train_base}", "--data", "{data}", "--lr", "nan"],
    ["train", "{train_base}", "--data", "{data}", "--rank", str(2**31)],
    ["train", "{train_base}", "--data", "{data}", "--alpha", "inf"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=[" ".join(a for a in args if "{" not in a) for args in BAD_OPTIONS])
def test_bad_option_values_are_usage_errors_before_any_work(args, world, inputs, tmp_path):
    inputs.add(world.base, world.a, world.b, world.train_base, world.data)
    out = tmp_path / "outputs" / ("out" if args[0] == "merge" else "out.safetensors")
    result = call_cli(*[a.format(**vars(world)) for a in args], "-o", out)
    assert result.returncode == 2 and "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert f"Invalid value for '{args[-2]}'" in result.stderr, result.stderr
    assert not out.parent.exists()


def overflowing_adapter(path: Path, weight: float) -> None:
    """A valid adapter on one target whose weight makes W + w·s·B·A overflow float32."""
    adapter = tiny_models.random_lora(tiny_models.llama(), ["model.layers.0.self_attn.q_proj"], seed=3)
    adapter.tensors = {name: tensor * 100 for name, tensor in adapter.tensors.items()}
    adapter.manifest.components[0].weight = weight
    save(adapter, path)


@pytest.mark.parametrize("weight", [1e37, 1e300])
def test_a_weight_that_overflows_the_merged_tensor_is_refused_by_name(weight, world, inputs, tmp_path):
    adapter = tmp_path / "adapters" / "huge.safetensors"
    adapter.parent.mkdir()
    overflowing_adapter(adapter, weight)
    inputs.add(world.base, adapter)
    out = tmp_path / "outputs" / "merged"
    result = call_cli("merge", world.base, adapter, "-o", out)
    assert_refused(result, "model.layers.0.self_attn.q_proj.weight", "NaN or Inf", "nothing was written")
    assert listing(out.parent) == set()


@pytest.mark.parametrize("config", [b"{not json", b"[1, 2]", b'"a string"', b"\xff\xfe{"],
                         ids=["not-json", "a-list", "a-string", "not-utf8"])
def test_a_base_config_that_is_not_a_json_object_is_refused_when_the_dtype_changes(config, world, inputs, tmp_path):
    """merge --dtype records the new dtype in the copied config.json, which must be a JSON object."""
    base = tmp_path / "base"
    shutil.copytree(world.base, base)
    (base / "config.json").write_bytes(config)
    inputs.add(base, world.a)
    out = tmp_path / "outputs" / "merged"
    result = call_cli("merge", base, world.a, "-o", out, "--dtype", "float16", "--force")
    assert_refused(result, f"{base / 'config.json'}: is not a JSON object")
    assert listing(out.parent) == set()
