"""The v1 format: round trips, versioning rules, atomic writes, errors by class."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import tiny_models
from adapterkit import fingerprint, load, save
from adapterkit.errors import FormatError
from adapterkit.io.adapter_file import MANIFEST_KEY, VERSION_KEY
from safetensors.numpy import save_file

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.fixture
def adapter():
    return tiny_models.random_lora(tiny_models.llama(), TARGETS)


def test_round_trip_keeps_manifest_and_tensors(tmp_path, adapter):
    path = tmp_path / "a.safetensors"
    save(adapter, path)
    loaded = load(path)
    assert loaded.manifest.to_json() == adapter.manifest.to_json()
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for name, tensor in adapter.tensors.items():
        assert np.array_equal(loaded.tensors[name], tensor) and loaded.tensors[name].dtype == tensor.dtype


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, adapter):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"previous content")
    adapter.tensors[next(iter(adapter.tensors))] = np.full((4, 32), np.nan, dtype=np.float32)
    with pytest.raises(FormatError, match="NaN"):
        save(adapter, path)
    assert path.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["a.safetensors"]


def _rewrite_metadata(src, dst, change):
    loaded = load(src)
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8 : 8 + n])["__metadata__"]
    change(metadata)
    save_file({k: np.ascontiguousarray(v) for k, v in loaded.tensors.items()}, dst, metadata=metadata)


def test_newer_minor_fields_are_kept_and_written_back(tmp_path, adapter):
    save(adapter, tmp_path / "a.safetensors")

    def to_1_2(metadata):  # a newer minor than ours (1.1)
        manifest = json.loads(metadata[MANIFEST_KEY])
        manifest["future_field"] = {"from": "1.2"}
        manifest["components"][0]["future_component_field"] = 7
        metadata[VERSION_KEY] = "1.2"
        metadata[MANIFEST_KEY] = json.dumps(manifest)

    _rewrite_metadata(tmp_path / "a.safetensors", tmp_path / "v12.safetensors", to_1_2)
    loaded = load(tmp_path / "v12.safetensors")
    save(loaded, tmp_path / "again.safetensors")
    raw = open(tmp_path / "again.safetensors", "rb").read()
    metadata = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]
    manifest = json.loads(metadata[MANIFEST_KEY])
    assert metadata[VERSION_KEY] == "1.2"
    assert manifest["future_field"] == {"from": "1.2"}
    assert manifest["components"][0]["future_component_field"] == 7


def test_a_newer_major_version_is_refused_by_name(tmp_path, adapter):
    save(adapter, tmp_path / "a.safetensors")
    _rewrite_metadata(tmp_path / "a.safetensors", tmp_path / "v2.safetensors",
                      lambda m: m.__setitem__(VERSION_KEY, "2.0"))
    with pytest.raises(FormatError, match=r"v2.safetensors: format version 2.0 is not supported"):
        load(tmp_path / "v2.safetensors")


def test_fingerprint_is_the_same_from_module_folder_and_file(tmp_path):
    model = tiny_models.llama()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    single = tmp_path / "single"
    model.save_pretrained(single)
    value = fingerprint(model)
    assert value == fingerprint(tmp_path / "m") == fingerprint(single) == fingerprint(single / "model.safetensors")
    assert value != fingerprint(tiny_models.llama(seed=1)), "same shapes, other weights: must differ"


def test_the_fingerprint_does_not_depend_on_the_head_class(tmp_path):
    """RoBERTa's classifier drops the checkpoint's pooler and adds a head: fp2 (spec §7) leaves both out, so the
    folder and every class loading it agree; fp1, which counts the pooler, does not."""
    from transformers import RobertaForSequenceClassification

    import families

    families.build("roberta").save_pretrained(tmp_path / "roberta")
    classifier = RobertaForSequenceClassification.from_pretrained(tmp_path / "roberta", num_labels=2)
    assert fingerprint(tmp_path / "roberta") == fingerprint(classifier) == fingerprint(families.build("roberta"))
    assert fingerprint(tmp_path / "roberta", algorithm="fp1") != fingerprint(classifier, algorithm="fp1")
