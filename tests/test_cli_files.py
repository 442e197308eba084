"""``adapterkit inspect``, ``validate`` and ``fingerprint`` as a user runs them: what they show is checked against
the file's own header (read here with the standard library), inputs are never modified, errors are one line."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

import tiny_models
from adapterkit import fingerprint
from cli_runner import call_cli

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, manifest, data buffer size) of a safetensors file, without adapterkit."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    metadata = header.pop("__metadata__")
    return header, json.loads(metadata["adapterkit.manifest"]), len(raw) - 8 - length


def digest_tree(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def composite(tmp_path):
    path = tmp_path / "composite.safetensors"
    shutil.copy(VECTORS / "valid_composite.safetensors", path)
    return path


def test_inspect_json_matches_the_file(composite):
    before = digest_tree(composite)
    result = call_cli("inspect", "--json", composite)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    entries, manifest, data_size = read_header(composite)

    assert summary["kinds"] == ["bitfit", "lora", "prefix"]
    assert summary["base_model"] == manifest["base_model"]
    assert summary["parameters"] == sum(math.prod(e["shape"]) for e in entries.values())
    assert summary["tensor_bytes"] == data_size
    assert summary["file_bytes"] == composite.stat().st_size
    assert summary["sha256"] == before[str(composite)]
    assert summary["composition"] == manifest["composition"]
    by_name = {c["name"]: c for c in summary["components"]}
    for component in manifest["components"]:
        shown = by_name[component["name"]]
        assert shown["kind"] == component["kind"] and shown["weight"] == component["weight"]
        assert shown["target_names"] == component["targets"]
        own = [e for n, e in entries.items() if n.startswith(component["name"] + ".")]
        assert shown["parameters"] == sum(math.prod(e["shape"]) for e in own)
    lora_a = [e["shape"][0] for n, e in entries.items() if n.endswith(".lora_A")]
    assert by_name["support"]["ranks"] == sorted(set(lora_a))
    assert by_name["prompt"]["prefix_length"] == 3
    assert digest_tree(composite) == before


def test_inspect_text_shows_the_essentials(composite):
    result = call_cli("inspect", composite)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    _, manifest, data_size = read_header(composite)
    assert "kinds       bitfit, lora, prefix" in text
    assert f"base model  {manifest['base_model']['id']} @ main" in text
    assert manifest["base_model"]["fingerprint"] in text
    assert f"in {data_size:,} bytes" in text
    assert "rank 2, alpha 4.0" in text and "prefix length 3" in text
    assert "model.layers.0.self_attn.q_proj" in text
    assert "composed    by concat" in text
    for source in manifest["composition"]["sources"]:
        assert f"from {source['name']} (weight {source['weight']:g}, sha256 {source['sha256'][:16]}" in text


def test_inspect_shows_per_target_ranks_and_rslora():
    result = call_cli("inspect", "--json", VECTORS / "valid_rslora_target_params.safetensors")
    component = json.loads(result.stdout)["components"][0]
    assert component["ranks"] == [1, 2] and component["params"]["scaling"] == "rslora"


def test_fingerprint_command_equals_the_library_and_modifies_nothing(tmp_path):
    model = tiny_models.llama(seed=3)
    folder = tmp_path / "base"
    model.save_pretrained(folder, max_shard_size="20KB")  # sharded: the index file is followed
    before = digest_tree(folder)
    result = call_cli("fingerprint", folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fingerprint(model) == fingerprint(folder)
    assert digest_tree(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(p).name for p in before)


def test_validate_and_inspect_leave_inputs_unchanged():
    files = sorted(VECTORS.glob("*.safetensors"))
    before = {str(VECTORS): digest_tree(VECTORS)}
    call_cli("validate", *files)
    call_cli("inspect", VECTORS / "valid_lora.safetensors")
    assert {str(VECTORS): digest_tree(VECTORS)} == before


@pytest.mark.parametrize("args, expected", [
    (["inspect", "missing.safetensors"], "missing.safetensors: no such file or folder"),
    (["inspect", VECTORS / "invalid_version_2_0.safetensors"], "format version 2.0 is not supported"),
    (["validate", VECTORS / "invalid_truncated.safetensors"], "truncated?"),
    (["fingerprint", VECTORS], "no model.safetensors"),
])
def test_errors_are_one_line(tmp_path, args, expected):
    result = call_cli(*args)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert len(output.splitlines()) == 1 and expected in output and "Traceback" not in output


def test_help_lists_every_command_without_importing_torch():
    """``adapterkit --help`` answers at once: it names every command but imports none of them (nor torch)."""
    import subprocess
    import sys

    import click

    from adapterkit.cli import COMMANDS, cli

    script = ("import sys\nfrom adapterkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert printed.strip().endswith("torch not imported")
    assert all(name in printed for name in COMMANDS)
    for name in COMMANDS:  # and each listed command exists
        assert isinstance(cli.get_command(None, name), click.Command), name


def test_the_format_layer_commands_run_without_torch(tmp_path):
    """inspect, validate, fingerprint of a file, compose and convert (LoRA to and from PEFT) are numpy work: they
    must not import torch or transformers (whose import alone takes seconds)."""
    import subprocess
    import sys

    import tiny_models
    from adapterkit import save

    model = tiny_models.llama()
    model.save_pretrained(tmp_path / "base")
    save(tiny_models.random_lora(model, ["model.layers.0.self_attn.q_proj"]), tmp_path / "a.safetensors")
    save(tiny_models.random_lora(model, ["model.layers.1.self_attn.v_proj"], seed=2), tmp_path / "b.safetensors")
    commands = [
        ["inspect", tmp_path / "a.safetensors"],
        ["validate", tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
        ["fingerprint", tmp_path / "base" / "model.safetensors"],
        ["compose", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--method", "svd", "--rank", "2",
         "-o", tmp_path / "c.safetensors"],
        ["convert", tmp_path / "c.safetensors", "--to", "peft", "-o", tmp_path / "peft"],
        ["convert", tmp_path / "peft", "-o", tmp_path / "back.safetensors"],
    ]
    for command in commands:
        script = ("import sys\nfrom adapterkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
                  "    assert not e.code, e.code\nprint(sorted({'torch', 'transformers'} & set(sys.modules)))")
        done = subprocess.run([sys.executable, "-c", script, *map(str, command)], capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip().splitlines()[-1] == "[]", (command[0], done.stdout)
