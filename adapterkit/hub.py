"""Share adapters on the Hugging Face Hub: push a file with its model card, pull it back verified.

A pushed repository holds, from ONE commit:

- ``adapter.safetensors``: the adapter file, byte for byte (whatever its local name was);
- ``adapterkit.json``: ``{"file": "adapter.safetensors", "sha256": ..., "size": ...}``, the record pull checks against;
- ``README.md``: a model card (:mod:`adapterkit.model_card`);
- with ``with_formats=["peft"]`` (``push --with-peft``): ``adapter_config.json`` and ``adapter_model.safetensors`` for
  PEFT users (the formats the converters registry marks for the Hub).

Pull refuses a revision with path tricks (:func:`check_revision`), resolves it (branch, tag or commit) to one commit,
reads and checks the record (a plain file name inside the repo, a sha256, a size) before anything else is downloaded,
asks the Hub for the file's size and refuses a file whose size differs from the record, then downloads through the
Hub client's cache (``hf_hub_download``) and refuses the file unless its sha256 matches the record and it passes the
format's strict reader. ``hf://REPO_ID[@REV][/FILE]`` references (:func:`download`) go through the same checks.

The endpoint is read from ``HF_ENDPOINT`` at call time (huggingface_hub reads it once, at import); the token comes
from where the client usually finds it (``HF_TOKEN``, ``hf auth login``). Every Hub call has a timeout: metadata calls
``HF_HUB_ETAG_TIMEOUT``, downloads and every other request ``HF_HUB_DOWNLOAD_TIMEOUT`` (seconds, 10 by default; read
by huggingface_hub at import into ``huggingface_hub.constants``, which is where this module reads them, at call time).
Every failure becomes a one-line AdapterError naming the repository.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    constants,
    get_hf_file_metadata,
    get_session,
    hf_hub_download,
    hf_hub_url,
    parse_hf_uri,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    HfUriError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from adapterkit.errors import AdapterError, HubError
from adapterkit.io.adapter_file import load
from adapterkit.io.digest import sha256_of
from adapterkit.io.outputs import write_file_atomically
from adapterkit.model_card import model_card
from adapterkit.text import printable

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
RECORD_FILE = "adapterkit.json"
CARD_FILE = "README.md"

#: the record is a few lines of JSON: anything larger is refused before it is downloaded
RECORD_MAX_BYTES = 64 * 1024
#: the adapter file a record may name: a plain relative file name inside the repo (and no ".." anywhere)
RECORD_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
SHA256 = re.compile(r"[0-9a-f]{64}")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
#: what git's check-ref-format forbids in a ref name, and "\\" and "%" (no URL-encoded "." or "/" either)
REVISION_FORBIDDEN = "~^:?*[\\%"


@dataclass
class Pushed:
    repo_id: str
    revision: str
    commit: str  # the new commit's sha
    commit_url: str
    sha256: str


@dataclass
class Fetched:
    """A verified adapter file in the Hub client's cache."""

    path: str
    repo_id: str
    commit: str
    filename: str
    sha256: str | None  # None when the repo has no adapterkit.json to check against (a file named in an hf:// ref)


def endpoint() -> str:
    """The Hub to talk to: ``HF_ENDPOINT`` as set now, else the client's default."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def push(path: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = False,
         message: str | None = None, with_formats: Sequence[str] = ()) -> Pushed:
    """Validate the adapter at ``path`` and upload it, its model card and its record in one commit to ``repo_id``.

    The repository is created if missing (private if asked); a ``revision`` branch is created from main if missing.
    ``with_formats`` names foreign formats (those the converters registry marks for the Hub, e.g. ``peft``) whose
    files go up beside ours, at the repository's root, so that tools reading that format find them.
    """
    branch = constants.DEFAULT_REVISION if revision is None else check_revision(revision, repo_id)
    with _hub_errors(repo_id, branch):
        validate_repo_id(repo_id)
    adapter = load(path)
    sha256, size = sha256_of(path), os.path.getsize(path)
    record = {"format": "adapterkit", "file": ADAPTER_FILE, "sha256": sha256, "size": size,
              "format_version": adapter.manifest.format_version}
    card = model_card(adapter, repo_id=repo_id, filename=ADAPTER_FILE, sha256=sha256, size=size)
    operations = [
        CommitOperationAdd(ADAPTER_FILE, os.fspath(path)),
        CommitOperationAdd(RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode()),
        CommitOperationAdd(CARD_FILE, card.encode()),
    ]
    api = HfApi(endpoint=endpoint())
    with (tempfile.TemporaryDirectory(prefix="adapterkit-formats-") as folder, _hub_errors(repo_id, branch),
          _bounded_session()):
        for name in with_formats:
            operations += _format_files(adapter, name, os.path.join(folder, name), path)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.create_commit(repo_id, operations, revision=branch,
                                 commit_message=message or f"Upload adapter ({sha256[:12]})")
    log.info("pushed %s to %s@%s as commit %s", path, repo_id, branch, info.oid)
    return Pushed(repo_id, branch, info.oid, info.commit_url, sha256)


def _format_files(adapter, format_name: str, folder: str, source) -> list[CommitOperationAdd]:
    """The adapter written in a foreign format (a folder of files, or one file named as the registry says), as commit
    operations for each file it wrote."""
    from adapterkit.converters.registry import FORMATS, converter

    format_ = FORMATS[format_name]
    if format_.hub_file:
        os.makedirs(folder)
        converter(format_name).write(adapter, os.path.join(folder, format_.hub_file), inputs=[source])
    else:
        converter(format_name).write(adapter, folder, inputs=[source])
    return [CommitOperationAdd(name, os.path.join(folder, name)) for name in sorted(os.listdir(folder))]


def fetch(repo_id: str, revision: str | None = None, filename: str | None = None) -> Fetched:
    """Download an adapter from ``repo_id`` at ``revision`` into the Hub cache and verify it.

    Without ``filename``, the file named by the repo's adapterkit.json. The record is checked before anything else is
    downloaded, the file's size on the Hub must be the recorded one before its bytes are downloaded, and its sha256
    must match the record after (else: corrupt or tampered, refused). The file must pass the format's strict reader.
    """
    revision = check_revision(constants.DEFAULT_REVISION if revision is None else revision, repo_id)
    where = f"hf://{printable(repo_id)}@{revision}"
    if filename is not None:
        _check_path_in_repo(filename, where)
    api = HfApi(endpoint=endpoint())
    with _hub_errors(repo_id, revision), _bounded_session():
        commit = api.repo_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        if not isinstance(commit, str) or not COMMIT_SHA.fullmatch(commit):  # it goes into the next URLs
            raise HubError(f"the Hub answered no commit sha for this revision ({printable(repr(commit))[:60]})",
                               where)
        record = _record(repo_id, commit, where, required=filename is None)  # one commit for the record and the file
        filename = filename or record["file"]
        recorded = record.get("file") == filename
        expected = record["sha256"] if recorded else None
        size = _hub_size(repo_id, filename, commit)
        if recorded and size is None:
            raise HubError(f"{filename}: the Hub gives no size for it, so it cannot be checked against "
                               f"{RECORD_FILE} before downloading; refusing it", where)
        if recorded and size != record["size"]:
            raise HubError(f"{filename}: the Hub gives its size as {_bytes(size)}, {RECORD_FILE} records "
                               f"{_bytes(record['size'])}: the file was changed or replaced; refusing it before "
                               "downloading it", where)
        path = _download(repo_id, filename, commit)
        if expected is None:
            log.warning("%s/%s: no sha256 recorded in %s; checking the format only", where, printable(filename),
                        RECORD_FILE)
        elif sha256_of(path) != expected:  # a damaged cache copy would fail forever: fetch it once more
            log.warning("%s/%s: sha256 mismatch in the local cache; downloading again", where, filename)
            path = _download(repo_id, filename, commit, force=True)
            actual = sha256_of(path)
            if actual != expected:
                raise HubError(f"{filename}: sha256 {actual[:16]}… differs from {expected[:16]}… recorded at "
                                   f"push in {RECORD_FILE}: the file is corrupt or was tampered with; refusing it",
                                   where)
    try:
        load(path)
    except AdapterError as exc:
        raise HubError(f"{printable(filename)}: {exc.reason}", where) from None
    return Fetched(path, repo_id, commit, filename, expected)


def _bytes(size: int | None) -> str:
    return "unknown" if size is None else f"{size:,} bytes"


def _hub_size(repo_id: str, filename: str, commit: str) -> int | None:
    """The size of ``filename`` at ``commit`` as the Hub gives it (a HEAD request: no bytes downloaded)."""
    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint())
    return get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT, endpoint=endpoint()).size


def _download(repo_id: str, filename: str, commit: str, force: bool = False) -> str:
    """``filename`` at ``commit`` through the client's cache. The metadata request waits HF_HUB_ETAG_TIMEOUT, the
    download HF_HUB_DOWNLOAD_TIMEOUT (the client reads that one itself)."""
    return hf_hub_download(repo_id, filename, revision=commit, endpoint=endpoint(), force_download=force,
                           etag_timeout=constants.HF_HUB_ETAG_TIMEOUT)


def _record(repo_id: str, commit: str, where: str, required: bool) -> dict:
    """The repo's adapterkit.json at ``commit``, checked (:func:`check_record`): {} when absent and not ``required``."""
    try:
        size = _hub_size(repo_id, RECORD_FILE, commit)
    except RemoteEntryNotFoundError:
        if required:
            raise HubError(f"no {RECORD_FILE}: not pushed by `adapterkit push`; name the file as "
                               f"hf://{repo_id}/FILE", where) from None
        return {}
    if size is None or size > RECORD_MAX_BYTES:
        raise HubError(f"{RECORD_FILE} is {_bytes(size)}, not a record of at most {RECORD_MAX_BYTES:,} bytes; "
                           "refusing it", where)
    path = _download(repo_id, RECORD_FILE, commit)
    try:
        record = json.loads(Path(path).read_bytes()[:RECORD_MAX_BYTES + 1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError, and the ValueError of a number too long to parse
        record = None
    if not isinstance(record, dict):
        raise HubError(f"{RECORD_FILE} is not a JSON object", where)
    check_record(record, where)
    return record


#: the record's fields: (name, the check, what it must be)
_RECORD_FIELDS = (
    ("file", lambda v: isinstance(v, str) and RECORD_FILE_NAME.fullmatch(v) is not None and ".." not in v,
     "a plain relative file name inside the repository"),
    ("sha256", lambda v: isinstance(v, str) and SHA256.fullmatch(v) is not None, "64 lower-case hex digits"),
    ("size", lambda v: type(v) is int and v >= 0, "a non-negative integer"),
)


def check_record(record: dict, where: str) -> None:
    """Refuse an adapterkit.json whose ``file``, ``sha256`` or ``size`` is not what ``adapterkit push`` writes."""
    for name, valid, what in _RECORD_FIELDS:
        if name not in record:
            raise HubError(f"{RECORD_FILE}: field '{name}' is missing; refusing the record", where)
        if not valid(record[name]):
            shown = printable(json.dumps(record[name]))
            shown = shown if len(shown) <= 60 else f"{shown[:60]}…"
            raise HubError(f"{RECORD_FILE}: field '{name}' must be {what}, not {shown}; refusing the record",
                               where)


def check_revision(revision: str, repo_id: str) -> str:
    """``revision`` as given when it is a plain branch, tag or commit name, else an AdapterError naming the repo.

    No path tricks (``..``, ``.`` segments, leading, trailing or doubled ``/``, ``\\``, ``%``-escapes), no control
    character or whitespace, nothing else git's check-ref-format forbids (``~ ^ : ? * [``, ``@{``, ``.lock``). Used for
    pull, fetch, ``push --revision`` and hf://REPO@REV references.
    """
    problem = _revision_problem(revision)
    if problem:
        raise HubError(f"revision refused: {problem}", f"hf://{printable(repo_id)}@{printable(revision)}")
    return revision


def _revision_problem(revision: object) -> str | None:
    if not isinstance(revision, str) or not revision:
        return "it is empty"
    for char in revision:
        if char.isspace() or printable(char) != char:
            return f"it holds whitespace or a control character ({printable(repr(char))})"
        if char in REVISION_FORBIDDEN:
            return f"{char!r} is not allowed"
    if "@{" in revision or revision == "@":
        return "'@{' is not allowed"
    if revision.startswith("/") or revision.endswith("/"):
        return "it starts or ends with '/'"
    if "//" in revision:
        return "it has an empty path segment ('//')"
    if ".." in revision:
        return "'..' is not allowed"
    segments = revision.split("/")
    if any(segment.startswith(".") or segment.endswith(".lock") for segment in segments) or revision.endswith("."):
        return "a part starts with '.', ends with '.lock', or the revision ends with '.'"
    return None


def _check_path_in_repo(filename: str, where: str) -> None:
    """A file named in an hf:// reference: a relative path inside the repo, nothing invisible."""
    segments = filename.split("/")
    if "\\" in filename or printable(filename) != filename or any(s in ("", ".", "..") for s in segments):
        raise HubError(f"file name {printable(repr(filename))} refused: not a relative path inside the repository",
                           where)


def pull(repo_id: str, output: str | os.PathLike | None = None, *, revision: str | None = None) -> tuple[Fetched, Path]:
    """Fetch and verify the adapter of ``repo_id``, then copy it to ``output`` atomically (an interrupted pull
    leaves no partial file there). ``output`` defaults to ``<repo name>.safetensors`` in the current folder."""
    fetched = fetch(repo_id, revision)
    output = Path(output if output is not None else f"{repo_id.split('/')[-1]}.safetensors")
    if output.is_dir():
        output = output / PurePosixPath(fetched.filename).name
    write_file_atomically(output, lambda tmp: shutil.copyfile(fetched.path, tmp), inputs=[fetched.path])
    return fetched, output


def download(ref: str) -> str:
    """A verified local file (in the Hub cache) for ``hf://REPO_ID[@REV][/FILE]``."""
    try:
        uri = parse_hf_uri(ref)
    except (HfUriError, HFValidationError) as exc:
        raise HubError(f"not a Hub reference of the form hf://NAMESPACE/NAME[@REV][/FILE] ({printable(exc)})",
                           printable(ref)) from None
    if uri.type != "model":
        raise HubError(f"adapters live in model repositories, not in a {uri.type}", printable(ref))
    if ref.endswith("/"):
        raise HubError("a Hub reference does not end with '/'", printable(ref))
    if uri.revision is not None:
        written = ref.partition("@")[2].split("/")[0]  # parse_hf_uri decodes %2F, %2e...: check what was written too
        check_revision(written if "%" in written else uri.revision, uri.id)
    return fetch(uri.id, uri.revision, uri.path_in_repo or None).path


@contextlib.contextmanager
def _bounded_session():
    """Give the client's shared HTTP session a default timeout while we use it.

    huggingface_hub's session has none, and create_repo, create_branch and create_commit (its preupload, LFS and
    commit requests) pass none: a Hub that accepts the connection and never answers would hold them forever. Its
    documented default for requests without one is HF_HUB_DOWNLOAD_TIMEOUT; the session's own settings come back
    after. Calls that take a timeout get theirs explicitly.
    """
    session = get_session()
    previous = session.timeout
    seconds = constants.HF_HUB_DOWNLOAD_TIMEOUT
    session.timeout = httpx2.Timeout(
        connect=seconds if previous.connect is None else previous.connect,
        read=seconds if previous.read is None else previous.read,
        write=seconds if previous.write is None else previous.write,
        pool=seconds if previous.pool is None else previous.pool,
    )
    try:
        yield
    finally:
        session.timeout = previous


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str):
    """Turn the Hub client's exceptions into one-line AdapterErrors naming the repository and what went wrong."""
    where = f"hf://{printable(repo_id)}@{printable(revision)}"
    try:
        yield
    except AdapterError:
        raise
    except LocalEntryNotFoundError as exc:  # the client hides why it could not reach the file: look underneath
        if exc.__cause__ is None:
            raise HubError(f"cannot reach the Hub at {endpoint()} and the file is not cached", where) from None
        raise _explain(exc.__cause__, where) from None
    except (HfHubHTTPError, httpx2.HTTPError, HfUriError, HFValidationError) as exc:
        raise _explain(exc, where) from None
    except OSError as exc:  # the cache folder (permissions, disk full), a download cut short
        raise HubError(f"{type(exc).__name__}: {_first_line(exc)}", where) from None


def _first_line(exc: BaseException) -> str:
    return printable((str(exc).strip().splitlines() or [""])[0])


#: which of a request's timeouts an httpx2 timeout exception ran into
_TIMEOUT_KINDS = ((httpx2.ConnectTimeout, "connect"), (httpx2.ReadTimeout, "read"), (httpx2.WriteTimeout, "write"),
                  (httpx2.PoolTimeout, "pool"))


def _timeout_of(exc: httpx2.TimeoutException) -> float | None:
    """The timeout (seconds) the request that raised ``exc`` ran under, when the exception knows its request."""
    try:
        timeouts = exc.request.extensions.get("timeout") or {}
    except RuntimeError:  # no request attached
        return None
    kind = next((name for cls, name in _TIMEOUT_KINDS if isinstance(exc, cls)), None)
    seconds = timeouts.get(kind)
    return seconds if seconds is not None else max((t for t in timeouts.values() if t is not None), default=None)


def _explain(exc: BaseException, where: str) -> AdapterError:
    if isinstance(exc, RepositoryNotFoundError):  # also 401 on a repo URL: the Hub hides private repos
        return HubError(f"repository not found on {endpoint()} (or private: check your token)", where)
    if isinstance(exc, RevisionNotFoundError):
        return HubError("revision not found (no such branch, tag or commit)", where)
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError("file not found in the repository: "
                            f"{printable(unquote(exc.response.url.path.rsplit('/', 1)[-1]))}", where)
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return HubError("the Hub refused the token (401): set HF_TOKEN or run `hf auth login`", where)
        if status == 403:
            return HubError("permission denied (403): the token may not write to this repository", where)
        return HubError(f"the Hub answered {status}: {_first_line(exc)}", where)
    if isinstance(exc, httpx2.TimeoutException):
        seconds = _timeout_of(exc)
        return HubError(f"the Hub at {endpoint()} did not answer "
                            f"{'in time' if seconds is None else f'within {seconds:g} s'} ({type(exc).__name__}; "
                            "HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT set how long to wait)", where)
    if isinstance(exc, (httpx2.ConnectError, httpx2.NetworkError)):
        return HubError(f"cannot reach the Hub at {endpoint()} ({type(exc).__name__}: {_first_line(exc)})", where)
    if isinstance(exc, (HfUriError, HFValidationError)):
        return HubError(f"invalid repository id or revision: {_first_line(exc)}", where)
    return HubError(f"{type(exc).__name__}: {_first_line(exc)}", where)
