"""Push and pull on the Hugging Face Hub: the REAL huggingface_hub client against our loopback Hub (hub_server.py).

Each test gets its own server, HF_ENDPOINT, HF_HOME and cache; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from peft import LoraConfig
from safetensors import safe_open

import tiny_models
from adapterkit import Adapter, AdapterError, Component, Manifest, load, save
from adapterkit.adapter import tensor_name
from adapterkit.arrays import to_torch
from adapterkit.cli import main
from adapterkit.model_card import model_card
from adapterkit.sources import load_adapter
from adapterkit.io.digest import sha256_of
from hub_server import HubServer

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
REPO = "me/support"


@pytest.fixture(scope="module")
def llama():
    return tiny_models.llama()


@pytest.fixture
def adapter_a(llama, tmp_path) -> Path:
    path = tmp_path / "a.safetensors"
    save(tiny_models.random_lora(llama, TARGETS, seed=1, base_id="tiny-org/tiny-llama"), path)
    return path


@pytest.fixture
def adapter_b(llama, tmp_path) -> Path:
    path = tmp_path / "b.safetensors"
    save(tiny_models.random_lora(llama, TARGETS, rank=2, seed=2, base_id="tiny-org/tiny-llama"), path)
    return path


def _hub_environment(monkeypatch, home: Path) -> None:
    """Point the client at a private HF_HOME, with Xet off, no stored token and no telemetry. huggingface_hub reads
    these at import time (huggingface_hub.constants), so set both the variables (for subprocesses) and the constants.
    Telemetry off: the client otherwise fetches {constants.ENDPOINT}/api/agent-harnesses (the real Hub, for
    in-process tests) once per process while building its user agent."""
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_HUB_DISABLE_XET": "1",
                        "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running loopback Hub with HF_ENDPOINT pointing at it; shut down after the test."""
    _hub_environment(monkeypatch, tmp_path / "hf")
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the adapterkit CLI in this process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    for fragment in fragments:
        assert fragment in line, line


def test_push_then_pull_gives_identical_bytes_in_one_commit(hub, adapter_a, tmp_path, capsys):
    code, out, err = cli(capsys, "push", adapter_a, REPO, "-m", "first adapter")
    assert code == 0, err
    head = hub.state.repos[REPO].branches["main"]
    assert head in out and "commit" in out

    commit = hub.state.repos[REPO].commits[head]
    assert commit.message == "first adapter"
    assert hub.state.repos[REPO].commits[commit.parent].parent is None  # the repo's creation, then our ONE commit
    assert {"adapter.safetensors", "adapterkit.json", "README.md"} <= set(commit.files)
    assert "adapter.safetensors" in commit.lfs  # uploaded through the LFS batch API and PUT
    record = json.loads(commit.files["adapterkit.json"])
    assert record["file"] == "adapter.safetensors"
    assert record["sha256"] == sha256_of(adapter_a) and record["size"] == adapter_a.stat().st_size

    pulled = tmp_path / "out" / "pulled.safetensors"
    code, out, err = cli(capsys, "pull", REPO, "-o", pulled)
    assert code == 0, err
    assert pulled.read_bytes() == adapter_a.read_bytes() == hub.file(REPO, "adapter.safetensors")
    assert head[:12] in out and "verified" in out
    assert not [p for p in pulled.parent.iterdir() if p.name != pulled.name]  # no temporary left behind


def test_new_push_is_a_new_revision_and_old_commits_and_tags_still_pull(hub, adapter_a, adapter_b, tmp_path, capsys):
    api = HfApi(endpoint=hub.url)
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    first = api.repo_info(REPO).sha
    api.create_tag(REPO, tag="v1", revision=first)  # the real client's create_tag against our server
    assert cli(capsys, "push", adapter_b, REPO)[0] == 0
    second = api.repo_info(REPO).sha
    assert second != first
    assert [ref.name for ref in api.list_repo_refs(REPO).tags] == ["v1"]

    for revision, expected in [(None, adapter_b), (first, adapter_a), ("v1", adapter_a), (second, adapter_b)]:
        out = tmp_path / f"pulled-{revision}.safetensors"
        code, _, err = cli(capsys, "pull", REPO, "-o", out, *(["--revision", revision] if revision else []))
        assert code == 0, err
        assert out.read_bytes() == expected.read_bytes(), revision

    # hf:// references: a tag, a commit, and a file named explicitly
    assert load_adapter(f"hf://{REPO}@v1").components[0].params["rank"] == 4
    assert load_adapter(f"hf://{REPO}@{second}/adapter.safetensors").components[0].params["rank"] == 2


def test_push_to_a_branch_leaves_main_alone(hub, adapter_a, adapter_b, tmp_path, capsys):
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    code, out, err = cli(capsys, "push", adapter_b, REPO, "--revision", "experiment")
    assert code == 0, err
    assert "@experiment" in out
    assert hub.file(REPO, "adapter.safetensors", "main") == adapter_a.read_bytes()
    assert hub.file(REPO, "adapter.safetensors", "experiment") == adapter_b.read_bytes()
    out = tmp_path / "exp.safetensors"
    assert cli(capsys, "pull", REPO, "--revision", "experiment", "-o", out)[0] == 0
    assert out.read_bytes() == adapter_b.read_bytes()


def test_private_repo_and_default_output_name(hub, adapter_a, tmp_path, capsys, monkeypatch):
    assert cli(capsys, "push", adapter_a, REPO, "--private")[0] == 0
    assert HfApi(endpoint=hub.url).repo_info(REPO).private is True
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "pull", REPO)[0] == 0
    assert (tmp_path / "support.safetensors").read_bytes() == adapter_a.read_bytes()  # NAME.safetensors


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_front_matter_and_body(hub, llama, tmp_path, capsys):
    lora = tiny_models.random_lora(llama, TARGETS, base_id="tiny-org/tiny-llama")
    bias_target = "model.layers.0.mlp.down_proj"
    bitfit = Component("bias", "bitfit", [bias_target])
    adapter = Adapter(
        Manifest(components=[*lora.components, bitfit], base_model=lora.manifest.base_model),
        {**lora.tensors, tensor_name("bias", bias_target, "bias"): torch.full((32,), 0.5)},
    )
    path = tmp_path / "mixed.safetensors"
    save(adapter, path)
    assert cli(capsys, "push", path, REPO)[0] == 0

    card = hub.file(REPO, "README.md").decode()
    metadata = front_matter(card)
    assert metadata["library_name"] == "adapterkit"
    assert metadata["base_model"] == "tiny-org/tiny-llama"
    assert set(metadata["tags"]) == {"adapterkit", "lora", "bitfit"}
    assert sha256_of(path) in card
    assert "rank 4" in card and "bitfit" in card  # the inspect summary
    assert f"adapterkit pull {REPO}" in card and f"hf://{REPO}" in card


def test_model_card_omits_a_base_model_that_is_a_local_path(hub, llama, tmp_path, capsys):
    path = tmp_path / "local-base.safetensors"
    save(tiny_models.random_lora(llama, TARGETS, base_id="/models/llama/"), path)
    assert cli(capsys, "push", path, REPO)[0] == 0
    metadata = front_matter(hub.file(REPO, "README.md").decode())
    assert "base_model" not in metadata  # the Hub would reject a card whose base_model is no model id
    assert metadata["library_name"] == "adapterkit"


def flipped(data: bytes) -> bytes:
    """The same bytes with the last one changed (same size, so the client's own size check passes)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize("tampered", ["adapter bytes", "recorded sha256"])
def test_tampered_upload_is_refused(hub, adapter_a, tmp_path, capsys, tampered):
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    if tampered == "adapter bytes":
        hub.tamper(REPO, "adapter.safetensors", flipped(hub.file(REPO, "adapter.safetensors")))
    else:
        record = json.loads(hub.file(REPO, "adapterkit.json"))
        record["sha256"] = "0" * 64
        hub.tamper(REPO, "adapterkit.json", json.dumps(record).encode())
    out = tmp_path / "pulled.safetensors"
    code, _, err = cli(capsys, "pull", REPO, "-o", out)
    assert_one_line_error(code, err, "sha256", "tampered", f"hf://{REPO}")
    assert not out.exists()
    with pytest.raises(AdapterError, match="tampered"):
        load_adapter(f"hf://{REPO}")
    if tampered == "adapter bytes":  # repaired on the Hub: the bad copy in the local cache is fetched again
        hub.tamper(REPO, "adapter.safetensors", adapter_a.read_bytes())
        code, _, err = cli(capsys, "pull", REPO, "-o", out)
        assert code == 0, err
        assert out.read_bytes() == adapter_a.read_bytes()


def test_a_file_that_is_no_adapter_is_refused_even_with_a_matching_record(hub, adapter_a, tmp_path, capsys):
    """A mirror that rewrites both the file and its record still cannot hand over something that is no adapter."""
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    junk = b"\x00" * 100
    hub.tamper(REPO, "adapter.safetensors", junk)
    record = json.loads(hub.file(REPO, "adapterkit.json"))
    hub.tamper(REPO, "adapterkit.json", json.dumps({**record, "sha256": hashlib.sha256(junk).hexdigest(),
                                                    "size": len(junk)}).encode())
    code, _, err = cli(capsys, "pull", REPO, "-o", tmp_path / "x.safetensors")
    assert_one_line_error(code, err, "adapter.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_interrupted_pull_leaves_no_partial_file(hub, adapter_a, tmp_path, capsys, monkeypatch):
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    out = tmp_path / "dest" / "pulled.safetensors"

    def copy_half_then_die(source, destination):
        Path(destination).write_bytes(Path(source).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr("adapterkit.hub.shutil.copyfile", copy_half_then_die)
    code, _, err = cli(capsys, "pull", REPO, "-o", out)
    assert code == 130 and err.strip() == "error: interrupted: stopped, temporary files removed"
    assert list(out.parent.iterdir()) == []


def test_invalid_file_is_refused_before_anything_is_uploaded(hub, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an adapter")
    code, _, err = cli(capsys, "push", bad, REPO)
    assert_one_line_error(code, err, "bad.safetensors")
    assert hub.state.repos == {}


def test_inspect_and_validate_accept_hub_references(hub, adapter_a, capsys):
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    code, out, err = cli(capsys, "inspect", f"hf://{REPO}", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["sha256"] == sha256_of(adapter_a)
    assert summary["base_model"]["id"] == "tiny-org/tiny-llama"
    assert summary["components"][0]["target_names"] == TARGETS
    code, out, _ = cli(capsys, "validate", f"hf://{REPO}@main")
    assert code == 0 and out.startswith("valid:")


def test_not_found_errors_are_one_line(hub, adapter_a, tmp_path, capsys):
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    assert_one_line_error(*cli(capsys, "pull", "me/nothing", "-o", tmp_path / "x")[::2], "me/nothing",
                          "repository not found")
    assert_one_line_error(*cli(capsys, "pull", REPO, "--revision", "nope", "-o", tmp_path / "x")[::2],
                          "revision not found", "@nope")
    assert_one_line_error(*cli(capsys, "inspect", f"hf://{REPO}/missing.safetensors")[::2],
                          "file not found", "missing.safetensors")
    assert_one_line_error(*cli(capsys, "inspect", "hf://no-namespace")[::2], "hf://NAMESPACE/NAME")
    assert not (tmp_path / "x").exists()


def test_pull_of_a_repo_without_adapterkit_record(hub, adapter_a, tmp_path, capsys):
    """A repo pushed by other tools: pull needs adapterkit.json, an hf:// ref naming the file checks the format."""
    api = HfApi(endpoint=hub.url)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=str(adapter_a), path_in_repo="weights/my.safetensors", repo_id=REPO)
    assert_one_line_error(*cli(capsys, "pull", REPO, "-o", tmp_path / "x")[::2], "adapterkit.json")
    assert load(hf_hub_download(REPO, "weights/my.safetensors", endpoint=hub.url)).manifest.base_model.id
    assert load_adapter(f"hf://{REPO}/weights/my.safetensors").components[0].targets == TARGETS


def test_token_missing_or_without_write_access(tmp_path, monkeypatch, adapter_a, capsys):
    _hub_environment(monkeypatch, tmp_path / "hf")
    with HubServer(tokens={"hf_writer": "write", "hf_reader": "read"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert_one_line_error(*cli(capsys, "push", adapter_a, REPO)[::2], "401", "HF_TOKEN")
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        assert_one_line_error(*cli(capsys, "push", adapter_a, REPO)[::2], "401")
        monkeypatch.setenv("HF_TOKEN", "hf_reader")
        assert_one_line_error(*cli(capsys, "push", adapter_a, REPO)[::2], "403")
        monkeypatch.setenv("HF_TOKEN", "hf_writer")
        assert cli(capsys, "push", adapter_a, REPO)[0] == 0
        monkeypatch.setenv("HF_TOKEN", "hf_reader")  # reading needs only a read token
        assert cli(capsys, "pull", REPO, "-o", tmp_path / "r.safetensors")[0] == 0
        monkeypatch.delenv("HF_TOKEN")
        assert_one_line_error(*cli(capsys, "pull", REPO, "-o", tmp_path / "n.safetensors")[::2], "401")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_gives_one_line_errors(tmp_path, monkeypatch, adapter_a, capsys):
    """In-process for pull, push and hf://, and once as a real subprocess (the environment read at import time)."""
    _hub_environment(monkeypatch, tmp_path / "hf")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    for args in (["pull", REPO, "-o", tmp_path / "x"], ["push", adapter_a, REPO], ["inspect", f"hf://{REPO}"]):
        assert_one_line_error(*cli(capsys, *args)[::2], "cannot reach the Hub", "127.0.0.1")
    result = subprocess.run([sys.executable, "-c", "from adapterkit.cli import main; main()", "pull", REPO,
                             "-o", str(tmp_path / "x")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert_one_line_error(result.returncode, result.stderr, "cannot reach the Hub")
    assert not (tmp_path / "x").exists()


def test_with_peft_uploads_files_that_peft_reads(hub, adapter_a, tmp_path, capsys):
    assert cli(capsys, "push", adapter_a, REPO, "--with-peft")[0] == 0
    folder = tmp_path / "peft"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.makedirs(folder, exist_ok=True)
        (folder / name).write_bytes(Path(hf_hub_download(REPO, name, endpoint=hub.url)).read_bytes())
    config = LoraConfig.from_pretrained(folder)
    assert config.r == 4 and config.lora_alpha == 8.0 and sorted(config.target_modules) == sorted(TARGETS)
    ours = load(adapter_a).component_tensors("default")
    with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
        for target in TARGETS:  # PEFT's key layout: base_model.model.<target>.lora_A.weight
            torch.testing.assert_close(weights.get_tensor(f"base_model.model.{target}.lora_A.weight"),
                                       to_torch(ours[target]["lora_A"]))


# --- nothing lost, nothing silently wrong ---------------------------------------------------------------------------


def seed_adapter(hub, path: Path, **record_changes) -> dict:
    """REPO on the loopback Hub holding the adapter at ``path`` and a record as push writes it, with changes (a value
    of ``...`` drops that field); returns the record."""
    data = path.read_bytes()
    record = {"format": "adapterkit", "file": "adapter.safetensors", "sha256": hashlib.sha256(data).hexdigest(),
              "size": len(data), "format_version": "1.0"}
    record.update(record_changes)
    record = {key: value for key, value in record.items() if value is not ...}
    hub.seed(REPO, {"adapter.safetensors": data, "adapterkit.json": json.dumps(record).encode()})
    return record


def file_requests(hub) -> list[tuple[str, str]]:
    """The requests for files (HEAD or GET .../resolve/...) the Hub saw, other than for adapterkit.json."""
    return [(method, path) for method, path in hub.state.requests
            if "/resolve/" in path and not path.endswith("/adapterkit.json")]


BAD_RECORD_FIELDS = [
    ("file", 5), ("file", None), ("file", ""), ("file", ["adapter.safetensors"]), ("file", "/adapter.safetensors"),
    ("file", "../adapter.safetensors"), ("file", "a/../adapter.safetensors"), ("file", "./adapter.safetensors"),
    ("file", "a//adapter.safetensors"), ("file", "a\\adapter.safetensors"), ("file", "adapter.safetensors\n"),
    ("file", "adapter\x00.safetensors"), ("file", "adapter..safetensors"), ("file", "adapter.safetensors/"),
    ("file", "%2e%2e/adapter.safetensors"), ("file", ...),
    ("sha256", None), ("sha256", "A" * 64), ("sha256", "0" * 63), ("sha256", "g" * 64), ("sha256", 0), ("sha256", ...),
    ("size", "x"), ("size", "123"), ("size", -1), ("size", 1.0), ("size", True), ("size", None), ("size", []),
    ("size", ...),
]


@pytest.mark.parametrize("field, value", BAD_RECORD_FIELDS,
                         ids=[f"{field}={value!r}" for field, value in BAD_RECORD_FIELDS])
def test_a_record_with_bad_fields_is_refused_before_anything_is_downloaded(hub, adapter_a, tmp_path, capsys,
                                                                              field, value):
    seed_adapter(hub, adapter_a, **{field: value})
    out = tmp_path / "pulled.safetensors"
    code, _, err = cli(capsys, "pull", REPO, "-o", out)
    assert_one_line_error(code, err, f"hf://{REPO}@main", "adapterkit.json", f"'{field}'", "refusing")
    assert file_requests(hub) == []  # not even a HEAD for the adapter
    assert not out.exists()
    with pytest.raises(AdapterError, match=f"'{field}'"):
        load_adapter(f"hf://{REPO}")


def test_an_oversized_record_is_refused_unread(hub, adapter_a, tmp_path, capsys):
    seed_adapter(hub, adapter_a, padding="x" * 100_000)
    code, _, err = cli(capsys, "pull", REPO, "-o", tmp_path / "x.safetensors")
    assert_one_line_error(code, err, f"hf://{REPO}@main", "adapterkit.json", "65,536 bytes")
    assert ("GET", f"/{REPO}/resolve/{hub.state.repos[REPO].branches['main']}/adapterkit.json") \
        not in hub.state.requests
    assert file_requests(hub) == []


def test_a_file_whose_size_differs_from_the_record_is_refused_before_its_bytes_are_downloaded(hub, adapter_a, tmp_path,
                                                                                               capsys):
    assert cli(capsys, "push", adapter_a, REPO)[0] == 0
    size = adapter_a.stat().st_size
    hub.tamper(REPO, "adapter.safetensors", adapter_a.read_bytes() + b"\0" * 1000)  # a replaced, larger file
    hub.state.requests.clear()
    out = tmp_path / "pulled.safetensors"
    code, _, err = cli(capsys, "pull", REPO, "-o", out)
    assert_one_line_error(code, err, f"hf://{REPO}@main", "adapter.safetensors", f"{size:,} bytes",
                          f"{size + 1000:,} bytes", "before downloading")
    assert [method for method, _ in file_requests(hub)] == ["HEAD"]  # asked for the size, never for the bytes
    assert not out.exists()
    with pytest.raises(AdapterError, match="size"):
        load_adapter(f"hf://{REPO}@main/adapter.safetensors")
    assert "GET" not in [method for method, _ in file_requests(hub)]


TRICKY_REVISIONS = [
    "..", "/..", "../main", "a/../b", "main/..", "/main", "main/", "a//b", ".", "./main", "main/.", ".hidden", "main.",
    "main.lock", "main\\x", "%2e%2e", "%2E%2E", "main%2f..%2fx", "main%2Fx", "main\nx", "main\rx", "main\x00",
    "main\x1b[31m", "\x7f", "main\x85", "main\u202e", "ma in", " main", "main\t", "main@{1}", "@", "main~1", "main^",
    "main^{}", "a:b", "main?", "main*", "main[0]",
]


@pytest.mark.parametrize("revision", TRICKY_REVISIONS, ids=[ascii(r) for r in TRICKY_REVISIONS])
@pytest.mark.parametrize("how", ["pull --revision", "hf://REPO@REV"])
def test_revision_with_path_tricks_is_refused_not_normalised(hub, adapter_a, tmp_path, capsys, how, revision):
    seed_adapter(hub, adapter_a)  # a good adapter on main: a trick resolved to main would pull it
    out = tmp_path / "pulled.safetensors"
    if how == "pull --revision":
        code, _, err = cli(capsys, "pull", REPO, "--revision", revision, "-o", out)
        assert_one_line_error(code, err, f"hf://{REPO}@", "revision refused")
    else:
        code, _, err = cli(capsys, "inspect", f"hf://{REPO}@{revision}")
        assert_one_line_error(code, err, f"hf://{REPO}@")
    assert len(err.strip().splitlines()) == 1  # a newline in the revision does not break the line either
    assert hub.state.requests == []  # refused before anything reached the Hub
    assert not out.exists()


def test_push_to_a_revision_with_path_tricks_is_refused(hub, adapter_a, capsys):
    for revision in TRICKY_REVISIONS:
        code, _, err = cli(capsys, "push", adapter_a, REPO, "--revision", revision)
        assert_one_line_error(code, err, f"hf://{REPO}@", "revision refused")
    assert hub.state.requests == [] and hub.state.repos == {}


def test_revision_check_lets_ordinary_names_through(hub, adapter_a, tmp_path, capsys):
    """Branches with slashes, tags with dots, full commit shas and the Hub's PR refs still pull."""
    seed_adapter(hub, adapter_a)
    commit = hub.state.repos[REPO].branches["main"]
    api = HfApi(endpoint=hub.url)
    for branch in ("feature/x-1", "refs/pr/1"):
        hub.state.repos[REPO].branches[branch] = commit
    api.create_tag(REPO, tag="v1.0_rc-2", revision=commit)
    for revision in ("feature/x-1", "v1.0_rc-2", commit, "refs/pr/1"):
        code, _, err = cli(capsys, "pull", REPO, "--revision", revision, "-o", tmp_path / "x.safetensors")
        assert code == 0, (revision, err)
    assert load_adapter(f"hf://{REPO}@refs/pr/1").components[0].targets == TARGETS


class SilentServer:
    """Accepts TCP connections and never answers (for ``hold`` seconds, then hangs up): a Hub that went quiet."""

    def __init__(self, hold: float = 30):
        self.hold = hold
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        self._socket.settimeout(0.05)
        connections = []
        while not self._stop.is_set():
            try:
                connections.append((self._socket.accept()[0], time.monotonic()))
            except TimeoutError:
                pass
            for connection, since in [c for c in connections if time.monotonic() - c[1] > self.hold]:
                connection.close()
                connections.remove((connection, since))
        for connection, _ in connections:
            connection.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


def test_a_hub_that_never_answers_gives_one_line_within_the_timeout(tmp_path, monkeypatch, adapter_a, capsys):
    """Pull, push and hf:// in-process with the timeouts set in huggingface_hub.constants, then once as a subprocess
    with them set by HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT (the client reads those at import)."""
    _hub_environment(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    with SilentServer() as silent:
        monkeypatch.setenv("HF_ENDPOINT", silent.url)
        for args in (["pull", REPO, "-o", tmp_path / "x"], ["push", adapter_a, REPO], ["inspect", f"hf://{REPO}"]):
            started = time.monotonic()
            code, _, err = cli(capsys, *args)
            assert_one_line_error(code, err, f"the Hub at {silent.url} did not answer within 1 s", f"hf://{REPO}@main")
            assert time.monotonic() - started < 8, args
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", "from adapterkit.cli import main; main()", "pull", REPO,
                                 "-o", str(tmp_path / "x")], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_ETAG_TIMEOUT": "1",
                                     "HF_HUB_DOWNLOAD_TIMEOUT": "1"})
        assert_one_line_error(result.returncode, result.stderr, "did not answer within 1 s", f"hf://{REPO}@main")
        assert time.monotonic() - started < 30
    assert not (tmp_path / "x").exists()


def test_a_hub_that_goes_quiet_on_file_requests_gives_one_line_within_the_timeout(tmp_path, monkeypatch, adapter_a,
                                                                                  capsys):
    """The API answers, the file requests do not: the client's own retry of a failed HEAD (60 s, several times)
    must not be what ends the pull."""
    _hub_environment(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    with HubServer(stall=r"/resolve/", stall_seconds=20) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        seed_adapter(server, adapter_a)
        started = time.monotonic()
        code, _, err = cli(capsys, "pull", REPO, "-o", tmp_path / "x")
        assert_one_line_error(code, err, "did not answer within 1 s", f"hf://{REPO}@main")
        assert time.monotonic() - started < 8
    assert not (tmp_path / "x").exists()


INJECTIONS = {  # strings a malicious adapter file may hold, each trying to end a line, a fence or the front matter
    "base id": "tiny-org/x\nlicense: evil\n---\n# injected base ```",
    "base revision": "main\r\n---\nlicense: evil",
    "producer": "evil\n````\n## injected producer",
    "producer version": "1\u2028---\x85# injected",
    "training key": "note\n# injected key",
    "training value": "v\n```\n# injected value \x1b[2J",
    "composition method": "svd\n---\n# injected method",
    "source name": "src\n---\nlicense: evil\n```",
}


def escaped(text: str) -> str:
    """How the card shows ``text``: newlines as \\n, other controls as \\xNN, separators and bidi as \\uXXXX."""
    short = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(short[c] if c in short else f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0
                   else f"\\u{ord(c):04x}" if c in "\u2028\u2029\u202e" else c for c in text)


def assert_card_is_clean(card: str, expected: dict) -> None:
    """Front matter with exactly the ``expected`` keys and values, the body with exactly our headings and fences:
    nothing injected."""
    assert card.startswith("---\n")
    front, body = card[len("---\n"):].split("\n---\n", 1)
    assert yaml.safe_load(front) == expected
    assert ModelCard(card).data.to_dict() == expected
    lines = body.splitlines()
    assert [line for line in lines if line.lstrip().startswith("#")] == ["# support", "## What it holds",
                                                                          "## How to use it"]
    fences = [line for line in lines if line.lstrip().startswith(("```", "~~~"))]
    assert len(fences) == 6 and fences[2:] == ["```bash", "```", "```python", "```"], fences
    opening, closing = fences[:2]  # the inspect block: a fence longer than any run of backticks inside
    assert opening == closing + "text" and set(closing) == {"`"}
    inside = body.split(opening + "\n", 1)[1].split("\n" + closing + "\n", 1)[0]
    assert closing not in inside
    assert not [line for line in lines if line.strip() in ("---", "***", "___") or line.startswith("license")]
    assert all(ch == "\n" or (ord(ch) >= 0x20 and ch not in "\x7f\x85\u2028\u2029\u202e") for ch in card)


def test_model_card_strings_from_the_file_cannot_inject_anything(hub, llama, tmp_path, capsys):
    adapter = tiny_models.random_lora(llama, TARGETS, base_id=INJECTIONS["base id"])
    manifest = adapter.manifest
    manifest.base_model.revision = INJECTIONS["base revision"]
    manifest.producer = {"name": INJECTIONS["producer"], "version": INJECTIONS["producer version"]}
    manifest.training = {INJECTIONS["training key"]: 1, "note": INJECTIONS["training value"]}
    manifest.composition = {"method": INJECTIONS["composition method"],
                            "sources": [{"name": INJECTIONS["source name"], "sha256": "0" * 64, "weight": 1.0}]}
    path = tmp_path / "evil.safetensors"
    save(adapter, path)
    assert load(path).manifest.producer["name"] == INJECTIONS["producer"]  # the format lets these strings through
    assert cli(capsys, "push", path, REPO)[0] == 0
    card = hub.file(REPO, "README.md").decode()
    # the base id is no Hub model id: left out of the front matter, which holds exactly this
    assert_card_is_clean(card, {"library_name": "adapterkit", "tags": ["adapterkit", "lora"]})
    for text in INJECTIONS.values():  # each shown escaped, on its line
        assert escaped(text) in card, escaped(text)


def test_model_card_component_names_and_targets_cannot_inject_anything(llama):
    """Names and targets the schema should stop (its patterns end in $, which lets a final newline through): the card
    does not count on it."""
    lora = tiny_models.random_lora(llama, TARGETS)
    name, suffix = "evil\n# injected name", "\n```\n---\n# injected target ````"
    tensors = {tensor_name(name, target + suffix, role): lora.tensors[tensor_name("default", target, role)]
               for target in TARGETS for role in ("lora_A", "lora_B")}
    component = Component(name, "lora", [target + suffix for target in TARGETS], dict(lora.components[0].params))
    adapter = Adapter(Manifest(components=[component], base_model=lora.manifest.base_model), tensors)
    card = model_card(adapter, repo_id=REPO, filename="adapter.safetensors", sha256="0" * 64, size=1)
    assert_card_is_clean(card, {"base_model": "tiny", "library_name": "adapterkit", "tags": ["adapterkit", "lora"]})
    assert "evil\\n# injected name" in card and "q_proj\\n```\\n---\\n# injected target ````" in card
