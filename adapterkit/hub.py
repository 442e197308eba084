"""Share adapters on the Hugging Face Hub: push a file with its model card, pull it back verified.

A pushed repository holds, from ONE commit:

- ``adapter.safetensors``: the adapter file, byte for byte (whatever its local name was);
- ``adapterkit.json``: ``{"file": "adapter.safetensors", "sha256": ..., "size": ...}``, the record pull checks against;
- ``README.md``: a model card (:mod:`adapterkit.model_card`);
- with ``with_peft``: ``adapter_config.json`` and ``adapter_model.safetensors`` for PEFT users.

Pull resolves the revision (branch, tag or commit) to one commit, downloads through the Hub client's cache
(``hf_hub_download``), then refuses the file unless its sha256 matches the record and it passes the format's strict
reader. ``hf://REPO_ID[@REV][/FILE]`` references (:func:`download`) go through the same checks.

The endpoint is read from ``HF_ENDPOINT`` at call time (huggingface_hub reads it once, at import); the token comes
from where the client usually finds it (``HF_TOKEN``, ``hf auth login``). Every failure becomes an AdapterError.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, parse_hf_uri
from huggingface_hub.errors import (
    HfHubHTTPError,
    HfUriError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from adapterkit.errors import AdapterError
from adapterkit.io.adapter_file import load
from adapterkit.io.digest import sha256_of
from adapterkit.io.outputs import write_file_atomically
from adapterkit.model_card import model_card

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
RECORD_FILE = "adapterkit.json"
CARD_FILE = "README.md"


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
         message: str | None = None, with_peft: bool = False) -> Pushed:
    """Validate the adapter at ``path`` and upload it, its model card and its record in one commit to ``repo_id``.

    The repository is created if missing (private if asked); a ``revision`` branch is created from main if missing.
    """
    adapter = load(path)
    sha256, size = sha256_of(path), os.path.getsize(path)
    branch = revision or constants.DEFAULT_REVISION
    record = {"format": "adapterkit", "file": ADAPTER_FILE, "sha256": sha256, "size": size,
              "format_version": adapter.manifest.format_version}
    card = model_card(adapter, repo_id=repo_id, filename=ADAPTER_FILE, sha256=sha256, size=size)
    operations = [
        CommitOperationAdd(ADAPTER_FILE, os.fspath(path)),
        CommitOperationAdd(RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode()),
        CommitOperationAdd(CARD_FILE, card.encode()),
    ]
    api = HfApi(endpoint=endpoint())
    with tempfile.TemporaryDirectory(prefix="adapterkit-peft-") as peft_folder, _hub_errors(repo_id, branch):
        if with_peft:
            operations += _peft_files(adapter, peft_folder)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.create_commit(repo_id, operations, revision=branch,
                                 commit_message=message or f"Upload adapter ({sha256[:12]})")
    log.info("pushed %s to %s@%s as commit %s", path, repo_id, branch, info.oid)
    return Pushed(repo_id, branch, info.oid, info.commit_url, sha256)


def _peft_files(adapter, folder: str) -> list[CommitOperationAdd]:
    """The adapter written by the PEFT converter, as commit operations for each file it wrote."""
    from adapterkit.converters import peft as peft_format

    peft_format.write(adapter, folder)
    return [CommitOperationAdd(name, os.path.join(folder, name)) for name in sorted(os.listdir(folder))]


def fetch(repo_id: str, revision: str | None = None, filename: str | None = None) -> Fetched:
    """Download an adapter from ``repo_id`` at ``revision`` into the Hub cache and verify it.

    Without ``filename``, the file named by the repo's adapterkit.json. The sha256 recorded there must match
    (else: corrupt or tampered, refused), and the file must pass the format's strict reader.
    """
    revision = revision or constants.DEFAULT_REVISION
    where = f"hf://{repo_id}@{revision}"
    api = HfApi(endpoint=endpoint())
    with _hub_errors(repo_id, revision):
        commit = api.repo_info(repo_id, revision=revision).sha  # one commit for the record and the file
        record = _record(repo_id, commit, required=filename is None)
        filename = filename or record.get("file")
        if not isinstance(filename, str) or not filename:
            raise AdapterError(f"{RECORD_FILE} names no adapter file", where)
        path = hf_hub_download(repo_id, filename, revision=commit, endpoint=endpoint())
        expected = record.get("sha256") if record.get("file") == filename else None
        if expected is None:
            log.warning("%s/%s: no sha256 recorded in %s; checking the format only", where, filename, RECORD_FILE)
        elif sha256_of(path) != expected:  # a damaged cache copy would fail forever: fetch it once more
            log.warning("%s/%s: sha256 mismatch in the local cache; downloading again", where, filename)
            path = hf_hub_download(repo_id, filename, revision=commit, endpoint=endpoint(), force_download=True)
            actual = sha256_of(path)
            if actual != expected:
                raise AdapterError(f"{filename}: sha256 {actual[:16]}… differs from {expected[:16]}… recorded at "
                                   f"push in {RECORD_FILE}: the file is corrupt or was tampered with; refusing it",
                                   where)
    try:
        load(path)
    except AdapterError as exc:
        raise AdapterError(f"{filename}: {exc.reason}", where) from None
    return Fetched(path, repo_id, commit, filename, expected)


def _record(repo_id: str, commit: str, required: bool) -> dict:
    """The repo's adapterkit.json at ``commit``: {} when absent and not ``required``."""
    try:
        path = hf_hub_download(repo_id, RECORD_FILE, revision=commit, endpoint=endpoint())
    except RemoteEntryNotFoundError:
        if required:
            raise AdapterError(f"no {RECORD_FILE}: not pushed by `adapterkit push`; name the file as "
                               f"hf://{repo_id}/FILE", f"hf://{repo_id}@{commit}") from None
        return {}
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        raise AdapterError(f"{RECORD_FILE} is not a JSON object", f"hf://{repo_id}@{commit}")
    return record


def pull(repo_id: str, output: str | os.PathLike | None = None, *, revision: str | None = None) -> tuple[Fetched, Path]:
    """Fetch and verify the adapter of ``repo_id``, then copy it to ``output`` atomically (an interrupted pull
    leaves no partial file there). ``output`` defaults to ``<repo name>.safetensors`` in the current folder."""
    fetched = fetch(repo_id, revision)
    output = Path(output if output is not None else f"{repo_id.split('/')[-1]}.safetensors")
    if output.is_dir():
        output = output / fetched.filename
    write_file_atomically(output, lambda tmp: shutil.copyfile(fetched.path, tmp), inputs=[fetched.path])
    return fetched, output


def download(ref: str) -> str:
    """A verified local file (in the Hub cache) for ``hf://REPO_ID[@REV][/FILE]``."""
    try:
        uri = parse_hf_uri(ref)
    except (HfUriError, HFValidationError) as exc:
        raise AdapterError(f"not a Hub reference of the form hf://NAMESPACE/NAME[@REV][/FILE] ({exc})", ref) from None
    if uri.type != "model":
        raise AdapterError(f"adapters live in model repositories, not in a {uri.type}", ref)
    return fetch(uri.id, uri.revision, uri.path_in_repo or None).path


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str):
    """Turn the Hub client's exceptions into one-line AdapterErrors naming the repository and what went wrong."""
    where = f"hf://{repo_id}@{revision}"
    try:
        yield
    except AdapterError:
        raise
    except LocalEntryNotFoundError as exc:  # the client hides why it could not reach the file: look underneath
        if exc.__cause__ is None:
            raise AdapterError(f"cannot reach the Hub at {endpoint()} and the file is not cached", where) from None
        raise _explain(exc.__cause__, where) from None
    except (HfHubHTTPError, httpx2.HTTPError, HfUriError, HFValidationError) as exc:
        raise _explain(exc, where) from None


def _explain(exc: BaseException, where: str) -> AdapterError:
    if isinstance(exc, RepositoryNotFoundError):  # also 401 on a repo URL: the Hub hides private repos
        return AdapterError(f"repository not found on {endpoint()} (or private: check your token)", where)
    if isinstance(exc, RevisionNotFoundError):
        return AdapterError("revision not found (no such branch, tag or commit)", where)
    if isinstance(exc, RemoteEntryNotFoundError):
        return AdapterError(f"file not found in the repository: {unquote(exc.response.url.path.rsplit('/', 1)[-1])}",
                            where)
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return AdapterError("the Hub refused the token (401): set HF_TOKEN or run `hf auth login`", where)
        if status == 403:
            return AdapterError("permission denied (403): the token may not write to this repository", where)
        return AdapterError(f"the Hub answered {status}: {str(exc).splitlines()[0]}", where)
    if isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError)):
        return AdapterError(f"cannot reach the Hub at {endpoint()} ({type(exc).__name__}: {exc})", where)
    if isinstance(exc, (HfUriError, HFValidationError)):
        return AdapterError(f"invalid repository id or revision: {exc}", where)
    return AdapterError(f"{type(exc).__name__}: {exc}", where)
