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
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants, hf_hub_download
from peft import LoraConfig
from safetensors import safe_open

import tiny_models
from adapterkit import Adapter, AdapterError, Component, Manifest, load, save
from adapterkit.adapter import tensor_name
from adapterkit.arrays import to_torch
from adapterkit.cli import main
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
    """Point the client at a private HF_HOME, with Xet off and no stored token. huggingface_hub reads these at
    import time (huggingface_hub.constants), so set both the variables (for subprocesses) and the constants."""
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


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
