"""A small Hugging Face Hub look-alike on loopback, so tests can drive the real ``huggingface_hub`` client offline.

It keeps model repositories in memory: commits (each a full snapshot of path -> bytes), branches, tags, and an LFS
object store. It answers the requests huggingface_hub 2.4 makes for create_repo, create_commit (preupload, LFS batch
and PUT, the NDJSON commit, validate-yaml), create_branch, create_tag, repo_info, list_repo_refs, list_repo_tree and
hf_hub_download (HEAD/GET ``resolve``), with the same status codes and ``X-Error-Code`` headers as the Hub, so the
client raises its usual exceptions. Set ``HF_HUB_DISABLE_XET=1``: this server speaks LFS, not Xet.

    with HubServer() as hub:            # hub.url -> "http://127.0.0.1:PORT"; point HF_ENDPOINT at it
        ...
    HubServer(tokens={"hf_w": "write", "hf_r": "read"})   # then requests need "Authorization: Bearer <token>"
    HubServer(stall=r"/resolve/")       # requests whose path matches get no answer (for up to stall_seconds)

Every request is logged in ``hub.state.requests`` as (method, path), so tests can tell what the client asked for.

As a program (for the demo script), it serves until stopped and prints its URL once ready:

    python tests/hub_server.py --port 8765
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

#: files at least this large, or with these endings, are stored through LFS (the Hub's rule is similar)
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_adapter")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    """An HTTP error answer: status, the Hub's X-Error-Code (if any) and a message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers, self.extra = status, code, headers or {}, extra or {}


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    lfs: dict[str, str] = field(default_factory=dict)  # LFS files: path -> the sha256 oid they were committed with


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch, a tag or a full commit sha -> the commit; the Hub's RevisionNotFound otherwise."""
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    """All repositories and LFS objects, guarded by one lock (the server is threaded)."""

    def __init__(self, tokens: dict[str, str] | None, stall: str | None = None, stall_seconds: float = 10):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path without the query), in the order they came
        self.stall, self.stall_seconds = stall, stall_seconds
        self.closing = threading.Event()  # set when the server shuts down: stalled requests give up then
        self.lock = threading.RLock()
        self._serial = count()

    def new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, bytes], lfs: dict[str, str]) -> Commit:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{next(self._serial)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        commit = Commit(digest.hexdigest(), parent, message, files, lfs)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]


class HubServer:
    """Runs the handler on a free loopback port in a background thread; use as a context manager."""

    def __init__(self, tokens: dict[str, str] | None = None, port: int = 0, stall: str | None = None,
                 stall_seconds: float = 10):
        self.state = HubState(tokens, stall, stall_seconds)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self.state))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.state.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.state.lock:
            return self.state.repo(repo_id).resolve(revision).files[path]

    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Replace the stored bytes of ``path`` behind the Hub's back (storage corruption, a malicious mirror)."""
        with self.state.lock:
            self.state.repo(repo_id).resolve(revision).files[path] = data

    def seed(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Create ``repo_id`` holding ``files`` in one commit on main, without going through HTTP (LFS for
        ``*.safetensors`` and the like, as a push would); returns the commit sha."""
        with self.state.lock:
            repo = self.state.repos[repo_id] = Repo(repo_id, private)
            self.state.new_commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, {})
            lfs = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()
                   if path.endswith(LFS_SUFFIXES)}
            for path in lfs:
                self.state.lfs_objects[lfs[path]] = files[path]
            parent = repo.commits[repo.branches["main"]]
            return self.state.new_commit(repo, "main", "seed", {**parent.files, **files}, lfs).oid


def _handler_for(state: HubState):
    class Handler(_HubHandler):
        hub = state

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubState
    protocol_version = "HTTP/1.1"

    # routes: (method, pattern on the raw path) -> handler name; groups are URL-unquoted before the call
    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", "preupload"),
        ("POST", r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", "commit"),
        ("POST", r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", "create_branch"),
        ("POST", r"/api/models/([^/]+/[^/]+)/tag/([^/]+)", "create_tag"),
        ("GET", r"/api/models/([^/]+/[^/]+)", "repo_info"),
        ("GET", r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", "repo_info"),
        ("GET", r"/api/models/([^/]+/[^/]+)/refs", "refs"),
        ("GET", r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", "tree"),
        ("POST", r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/([0-9a-f]{64})", "lfs_upload"),
        ("GET", r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", "resolve"),
        ("HEAD", r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", "resolve"),
    ]

    def log_message(self, format, *args):  # quiet: tests read their own output
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # --- plumbing -------------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()
        with self.hub.lock:
            self.hub.requests.append((method, url.path))
        if self.hub.stall and re.search(self.hub.stall, url.path):  # a Hub that took the request and went quiet
            self.hub.closing.wait(self.hub.stall_seconds)
            self.close_connection = True
            return
        try:
            for route_method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    with self.hub.lock:
                        status, payload, headers = getattr(self, name)(*map(unquote, match.groups()))
                    break
            else:
                raise HubError(404, f"no route for {method} {url.path}")
        except HubError as error:
            status, payload = error.status, {"error": str(error), **error.extra}
            headers = {**error.headers, "X-Error-Message": str(error)}
            if error.code:
                headers["X-Error-Code"] = error.code
        self._answer(method, status, payload, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, method: str, status: int, payload, headers: dict) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        if not isinstance(payload, bytes):
            headers = {"Content-Type": "application/json", **headers}
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")

    def _require(self, access: str) -> None:
        """Authorize like the Hub: no or an unknown token -> 401, a read token where writing is needed -> 403."""
        if self.hub.tokens is None:
            return
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        role = self.hub.tokens.get(token)
        if role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if access == "write" and role != "write":
            raise HubError(403, "You don't have the rights to write to this repository")

    def _base(self) -> str:
        return f"http://{self.headers['Host']}"

    # --- repositories -----------------------------------------------------------------------------------------------

    def create_repo(self):
        self._require("write")
        request = self._json()
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        url = f"{self._base()}/{repo_id}"
        if repo_id in self.hub.repos:
            # the Hub's 409 still carries the url, which create_repo(exist_ok=True) relies on
            raise HubError(409, "You already created this model repo", extra={"url": url})
        repo = Repo(repo_id, private=request.get("visibility") == "private" or bool(request.get("private")))
        self.hub.repos[repo_id] = repo
        self.hub.new_commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, {})
        return 200, {"url": url, "name": repo_id}, {}

    def repo_info(self, repo_id, revision="main"):
        self._require("read")
        repo = self.hub.repo(repo_id)
        commit = repo.resolve(revision)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}, {}

    def refs(self, repo_id):
        self._require("read")
        repo = self.hub.repo(repo_id)

        def listing(refs, kind):
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(refs.items())]

        return 200, {"branches": listing(repo.branches, "heads"), "tags": listing(repo.tags, "tags"),
                     "converts": []}, {}

    def tree(self, repo_id, revision):
        self._require("read")
        commit = self.hub.repo(repo_id).resolve(revision)
        entries = []
        for path, data in sorted(commit.files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in commit.lfs:
                entry["lfs"] = {"oid": commit.lfs[path], "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return 200, entries, {}

    def create_branch(self, repo_id, branch):
        self._require("write")
        repo = self.hub.repo(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = repo.resolve(self._json().get("startingPoint") or "main").oid
        return 200, {}, {}

    def create_tag(self, repo_id, revision):
        self._require("write")
        repo = self.hub.repo(repo_id)
        tag = self._json()["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = repo.resolve(revision).oid
        return 200, {}, {}

    # --- uploads ----------------------------------------------------------------------------------------------------

    def validate_yaml(self):
        content = self._json().get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}, {}
        if match and not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _branch(self, repo: Repo, revision: str) -> str:
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return revision

    def preupload(self, repo_id, revision):
        self._require("write")
        self._branch(self.hub.repo(repo_id), revision)
        files = [{"path": f["path"], "shouldIgnore": False,
                  "uploadMode": "lfs" if f["size"] >= LFS_THRESHOLD or f["path"].endswith(LFS_SUFFIXES) else "regular"}
                 for f in self._json()["files"]]
        return 200, {"files": files}, {}

    def lfs_batch(self, repo_id):
        self._require("write")
        self.hub.repo(repo_id)
        objects = []
        for obj in self._json()["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:  # already stored: no actions, the client skips the upload
                answer["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}"}}
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def lfs_upload(self, oid):
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "LFS object content does not match its oid")
        self.hub.lfs_objects[oid] = self.body
        return 200, {}, {}

    def commit(self, repo_id, revision):
        self._require("write")
        repo = self.hub.repo(repo_id)
        branch = self._branch(repo, revision)
        parent = repo.commits[repo.branches[branch]]
        files, lfs = dict(parent.files), dict(parent.lfs)
        message = "commit"
        for line in self.body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
                if value.get("parentCommit") not in (None, parent.oid):
                    raise HubError(412, "parentCommit is not the branch head")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.pop(value["path"], None)
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
                lfs[value["path"]] = value["oid"]
            elif key == "deletedFile":
                files.pop(value["path"], None)
                lfs.pop(value["path"], None)
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        commit = self.hub.new_commit(repo, branch, message, files, lfs)
        return 200, {"commitUrl": f"{self._base()}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid}, {}

    # --- downloads --------------------------------------------------------------------------------------------------

    def resolve(self, repo_id, revision, path):
        self._require("read")
        commit = self.hub.repo(repo_id).resolve(revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        # like the Hub: an LFS file's ETag is its oid (the sha256 it was committed with, even if the stored bytes
        # were damaged since), a regular file's its git blob id
        etag = commit.lfs.get(path) or git_blob_sha1(data)
        return 200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}



if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A Hub look-alike on loopback, in memory, for demos and tests.")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    with HubServer(port=parser.parse_args().port) as server:
        print(server.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
