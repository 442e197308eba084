"""The conformance vectors of spec/vectors/: every verdict holds through the library and through the CLI, the
generator reproduces the committed bytes, and the values the spec writes out (LoRA math, the fingerprint) match the
implementation."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import ml_dtypes
import numpy as np
import pytest
import torch

from adapterkit import AdapterError, fingerprint, load, save
from cli_runner import call_cli, run_cli
from tiny_models import merged_delta, torch_roles

SPEC = Path(__file__).resolve().parent.parent / "spec"
VECTORS = SPEC / "vectors"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())


def test_the_vector_set_is_complete():
    files = sorted(p.name for p in VECTORS.glob("*.safetensors"))
    assert files == sorted(EXPECTED)
    assert sum(v["valid"] for v in EXPECTED.values()) >= 7 and sum(not v["valid"] for v in EXPECTED.values()) >= 15


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_library_verdict(name):
    verdict = EXPECTED[name]
    path = VECTORS / name
    if verdict["valid"]:
        adapter = load(path)
        assert adapter.tensors and adapter.manifest.components
        return
    with pytest.raises(AdapterError) as caught:
        load(path)
    assert verdict["reason"] in caught.value.reason
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_cli_validate_reports_every_file_on_one_line():
    files = [str(VECTORS / name) for name in sorted(EXPECTED)]
    result = run_cli("validate", *files)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(files)
    for line, name in zip(lines, sorted(EXPECTED)):
        verdict = EXPECTED[name]
        if verdict["valid"]:
            assert line == f"valid: {VECTORS / name}"
        else:
            assert line.startswith(f"invalid: {VECTORS / name}: ") and verdict["reason"] in line


def test_cli_validate_exits_0_when_all_files_are_valid():
    files = [str(VECTORS / name) for name, verdict in sorted(EXPECTED.items()) if verdict["valid"]]
    result = call_cli("validate", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"valid: {f}" for f in files]


def test_make_vectors_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(SPEC / "make_vectors.py"), str(tmp_path)], check=True, timeout=120)
    regenerated = sorted(p.name for p in tmp_path.iterdir())
    assert regenerated == sorted(p.name for p in VECTORS.iterdir())
    for name in regenerated:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name


def test_rslora_vector_follows_the_spec_math():
    """SPEC §6.2: s = α/√r per target with overrides; fan_in_fan_out targets get ΔWᵀ. Computed here by hand."""
    adapter = load(VECTORS / "valid_rslora_target_params.safetensors")
    component = adapter.components[0]
    arrays = adapter.component_tensors(component.name)
    deltas = {target: merged_delta(component, target, roles) for target, roles in arrays.items()}
    tensors = {target: torch_roles(roles) for target, roles in arrays.items()}
    q, v, embed = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.embed_tokens"
    expected_q = 4.0 / math.sqrt(2) * tensors[q]["lora_B"] @ tensors[q]["lora_A"]
    expected_v = 2.0 / math.sqrt(1) * tensors[v]["lora_B"] @ tensors[v]["lora_A"]
    expected_embed = (4.0 / math.sqrt(2) * tensors[embed]["lora_B"] @ tensors[embed]["lora_A"]).T
    torch.testing.assert_close(deltas[q], expected_q)
    torch.testing.assert_close(deltas[v], expected_v)
    assert deltas[embed].shape == (16, 8)  # the embedding's stored layout [num_embeddings, dim]
    torch.testing.assert_close(deltas[embed], expected_embed)


def test_composite_vector_records_its_sources_by_hash():
    composite = load(VECTORS / "valid_composite.safetensors")
    assert [c.kind for c in composite.components] == ["lora", "prefix", "bitfit"]
    for source in composite.manifest.composition["sources"]:
        assert hashlib.sha256((VECTORS / source["name"]).read_bytes()).hexdigest() == source["sha256"]


def _manifest_of(name: str) -> dict:
    raw = (VECTORS / name).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return json.loads(header["__metadata__"]["adapterkit.manifest"])


def test_the_published_schema_accepts_the_valid_manifests_and_refuses_schema_breaks():
    schema = json.loads((SPEC / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name, verdict in EXPECTED.items():
        if verdict["valid"]:
            assert not list(validator.iter_errors(_manifest_of(name))), name
    for name in ("invalid_prefix_weighted.safetensors", "invalid_target_named_twice.safetensors"):
        assert list(validator.iter_errors(_manifest_of(name))), name
    composite = _manifest_of("valid_composite.safetensors")
    assert validator.is_valid(dict(composite, composition=None))
    assert not validator.is_valid(dict(composite, composition={"method": "concat"}))


def _bfloat16_bits(values: np.ndarray) -> bytes:
    """float32 -> bfloat16, round to nearest even, little-endian 2-byte values (SPEC §7 step 2)."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()


def test_fingerprint_worked_example_of_the_spec():
    """The base of the vectors (a plain safetensors file) fingerprinted from the spec's text, with numpy only: fp1
    over every matrix, fp2 without the task head (``score``)."""
    base = VECTORS / "invalid_no_manifest_plain_base.safetensors"
    raw = base.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    records = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32" or len(info["shape"]) < 2:
            continue
        begin, end = info["data_offsets"]
        array = np.frombuffer(raw[8 + length + begin : 8 + length + end], "<f4").reshape(info["shape"])
        sample = np.concatenate([array[0].ravel(), array[-1].ravel()])
        shape = "x".join(map(str, info["shape"]))
        records[name] = f"{shape}:{hashlib.sha256(_bfloat16_bits(sample)).hexdigest()}"
    fp1 = "fp1:" + hashlib.sha256("\n".join(sorted(records.values())).encode()).hexdigest()
    fp2 = "fp2:" + hashlib.sha256("\n".join(sorted(r for n, r in records.items() if n != "score.weight")).encode()
                                  ).hexdigest()
    assert fingerprint(base, algorithm="fp1") == fp1 and fingerprint(base) == fp2
    assert load(VECTORS / "valid_lora.safetensors").manifest.base_model.fingerprint == fp1
    spec = (SPEC / "SPEC.md").read_text()
    assert fp1 in spec and fp2 in spec, "the spec's worked example must show these values"


def test_bfloat16_rounding_is_to_nearest_even():
    # 1 + 2^-8 lies halfway between two bfloat16 values: it rounds to the even one (1.0); 1 + 3·2^-8 rounds up.
    halfway = np.array([1 + 2**-8, 1 + 3 * 2**-8], dtype=np.float32)
    expected = torch.tensor(halfway).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    assert _bfloat16_bits(halfway) == expected
    assert np.frombuffer(expected, "<u2").tolist() == [0x3F80, 0x3F82]
    assert halfway.astype(ml_dtypes.bfloat16).view("<u2").tobytes() == expected  # the fingerprint's own rounding


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_a_newer_minor_file_keeps_its_unknown_fields_and_version_when_written_back(tmp_path, version):
    """SPEC §9.2: a reader keeps a newer minor's fields and writes the highest version it preserves (this one is
    1.1: a 1.2 file is written back as 1.2)."""
    name = f"valid_v{version.replace('.', '_')}_unknown_fields.safetensors"
    save(load(VECTORS / name), tmp_path / "again.safetensors")
    raw = (tmp_path / "again.safetensors").read_bytes()
    metadata = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert metadata["adapterkit.format_version"] == version
    assert json.loads(metadata["adapterkit.manifest"]) == _manifest_of(name)
