"""AdapterHub's bottleneck adapters read as the ``adapter`` kind, its LoRA as ``lora`` and its (IA)³ as ``ia3``: the
logits (hidden states) with the converted adapter attached equal those AdapterHub's own library computed
(tests/fixtures/make_adapterhub_files.py, run with the ``adapters`` library in a virtual environment of its own);
what does not read exactly is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import BertModel, GPT2LMHeadModel

from adapterkit import fingerprint, load
from adapterkit.attach import attach
from adapterkit.converters import adapterhub
from adapterkit.converters.registry import detect_format
from adapterkit.errors import FormatError
from cli_runner import call_cli

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
EXPECTED = load_file(FIXTURES / "expected.safetensors")
CASES = {"bert_houlsby": "bert", "bert_pfeiffer": "bert", "gpt2_houlsby": "gpt2"}
#: LoRA (composition_mode add) and (IA)³ (scale) adapters -> the kind they read as
LORA_CASES = {"bert_lora": "lora", "bert_ia3": "ia3", "gpt2_lora": "lora", "gpt2_ia3": "ia3"}
CLASSES = {"bert": BertModel, "gpt2": GPT2LMHeadModel}


def output(model) -> torch.Tensor:
    ids, mask = (torch.from_numpy(EXPECTED[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def compared(tensor) -> torch.Tensor:
    """The positions that are defined: a causal LM's left-padded positions attend to nothing."""
    return torch.as_tensor(tensor)[torch.from_numpy(EXPECTED["attention_mask"]).bool()]


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("name", list(CASES))
def test_attached_output_equals_adapterhubs(name, with_base):
    family = CASES[name]
    base = FIXTURES / f"base_{family}"
    model = CLASSES[family].from_pretrained(base).eval()
    torch.testing.assert_close(compared(output(model)), compared(EXPECTED[f"{family}_base"]), atol=1e-5, rtol=0)
    assert detect_format(FIXTURES / name) == "adapterhub"
    adapter = adapterhub.read(FIXTURES / name, base=base if with_base else None)
    [component] = adapter.components
    assert component.kind == "adapter"
    assert component.params["placement"] == name.split("_")[1]
    if with_base:
        assert adapter.manifest.base_model.recorded() == {"fp1": fingerprint(base, algorithm="fp1"),
                                                          "fp2": fingerprint(base)}
    with attach(model, adapter):
        attached = output(model)
    torch.testing.assert_close(compared(attached), compared(EXPECTED[name]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compared(attached), compared(EXPECTED[f"{family}_base"]), atol=1e-2)


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("name", list(LORA_CASES))
def test_lora_and_ia3_attached_outputs_equal_adapterhubs(tmp_path, name, with_base):
    """Converted with the convert command (the registry's path), loaded and attached: AdapterHub's own outputs."""
    family = name.split("_")[0]
    base = FIXTURES / f"base_{family}"
    assert detect_format(FIXTURES / name) == "adapterhub"
    out = tmp_path / f"{name}.safetensors"
    done = call_cli("convert", FIXTURES / name, "-o", out, *(["--base", base] if with_base else []))
    assert done.returncode == 0, done.stderr
    adapter = load(out)
    [component] = adapter.components
    assert component.kind == LORA_CASES[name]
    model = CLASSES[family].from_pretrained(base).eval()
    with attach(model, adapter):
        attached = output(model)
    torch.testing.assert_close(compared(attached), compared(EXPECTED[name]), atol=1e-5, rtol=0)
    assert not torch.allclose(compared(attached), compared(EXPECTED[f"{family}_base"]), atol=1e-2)


def test_gpt2s_fused_projection_becomes_one_block_lora():
    """q and v of GPT-2's c_attn (AdapterHub's A [2r, in], B [2·d, r]) as one LoRA of rank 2r: B [3d, 2r] holds q's
    rows in its first r columns, v's in its last, zero in the key third; alpha 2·alpha keeps the scale alpha/r."""
    adapter = adapterhub.read(FIXTURES / "gpt2_lora")
    [component] = adapter.components
    config = json.loads((FIXTURES / "gpt2_lora" / "adapter_config.json").read_text())["config"]
    r, alpha = config["r"], config["alpha"]
    assert component.params == {"rank": r, "alpha": alpha, "scaling": "standard", "fan_in_fan_out": True}
    assert component.target_params["transformer.h.0.attn.c_attn"] == {"rank": 2 * r, "alpha": 2 * alpha}
    saved = load_file(FIXTURES / "gpt2_lora" / "adapter.safetensors")
    saved = saved["transformer.h.0.attn.c_attn.loras.gpt2_lora.lora_B"]
    b = adapter.tensors["gpt2_lora.transformer.h.0.attn.c_attn.lora_B"]
    d = b.shape[0] // 3
    np.testing.assert_array_equal(b[:d, :r], saved[:d])
    np.testing.assert_array_equal(b[2 * d:, r:], saved[d:])
    assert not b[:d, r:].any() and not b[d:2 * d].any() and not b[2 * d:, :r].any()


def test_convert_command_writes_a_valid_file(tmp_path):
    out = tmp_path / "pfeiffer.safetensors"
    done = call_cli("convert", FIXTURES / "bert_pfeiffer", "-o", out, "--base", FIXTURES / "base_bert")
    assert done.returncode == 0, done.stderr
    adapter = load(out)
    assert adapter.components[0].params == {"bottleneck": 4, "non_linearity": "gelu", "placement": "pfeiffer"}


def test_stock_seq_bn_is_refused_saying_why():
    with pytest.raises(FormatError, match="original_ln_before=True is not supported: the adapter reads LayerNorm"):
        adapterhub.read(FIXTURES / "bert_seq_bn")


def test_pickled_weights_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(FIXTURES / "bert_houlsby" / "adapter_config.json", folder)
    (folder / "pytorch_adapter.bin").write_bytes(b"\x80\x04not really a pickle")
    assert detect_format(folder) == "adapterhub"
    done = call_cli("convert", folder, "-o", tmp_path / "out.safetensors")
    assert done.returncode == 1 and "it is a pickle, which adapterkit never loads" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out.safetensors").exists()


def _edited(tmp_path, source="bert_houlsby", **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(FIXTURES / source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["config"].update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, problem", [
    ({"is_parallel": True}, "is_parallel=True is not supported: a parallel adapter"),
    ({"ln_after": True}, "ln_after=True is not supported"),
    ({"use_gating": True}, "use_gating=True is not supported"),
    ({"phm_layer": True}, "phm_layer=True is not supported"),
    ({"architecture": "prefix_tuning"}, "'prefix_tuning' adapters are not read"),
    ({"non_linearity": "softplus"}, "unknown non_linearity"),
    ({"mh_adapter": False}, "at places its config does not name"),
    ({"scaling": "learned"}, "lacks its learned scaling"),
])
def test_configurations_that_do_not_read_exactly_are_refused(tmp_path, changes, problem):
    with pytest.raises(FormatError, match=problem):
        adapterhub.read(_edited(tmp_path, **changes))


@pytest.mark.parametrize("name, changes, problem", [
    ("bert_lora", {"use_gating": True}, "use_gating=True is not supported: the LoRA is gated"),
    ("bert_lora", {"composition_mode": "multiply"}, "composition_mode='multiply' is not supported"),
    ("bert_lora", {"use_dora": True}, "use_dora=True is not supported"),
    ("bert_lora", {"vera_d": 0.1}, "vera_d=0.1 is not supported: it is VeRA"),
    ("bert_lora", {"r": 2}, "not \\[2, in\\] and \\[out, 2\\]"),
    ("bert_lora", {"composition_mode": "scale", "r": 1}, "holds lora_A, lora_B, not lora_B"),
    ("bert_ia3", {"composition_mode": "add", "r": 1}, "holds lora_B, not lora_A, lora_B"),
    ("gpt2_lora", {"attn_matrices": ["q", "k", "v"]}, "not \\[6, in\\]"),
])
def test_loras_that_do_not_read_exactly_are_refused_in_one_line(tmp_path, name, changes, problem):
    folder = _edited(tmp_path, name, **changes)
    with pytest.raises(FormatError, match=problem) as raised:
        adapterhub.read(folder)
    assert str(folder) in str(raised.value) and "\n" not in str(raised.value)


def test_a_lora_config_without_its_defaults_reads_as_with_them(tmp_path):
    """LoRAConfig's defaults (composition_mode add, attn_matrices q and v) where the config leaves them out."""
    folder = _edited(tmp_path, "gpt2_lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    for option in ("composition_mode", "attn_matrices"):
        del config["config"][option]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    read, saved = adapterhub.read(folder), adapterhub.read(FIXTURES / "gpt2_lora")
    assert read.components[0].target_params == saved.components[0].target_params
    assert all(np.array_equal(read.tensors[name], tensor) for name, tensor in saved.tensors.items())


def test_a_scaling_is_folded_into_the_up_projection(tmp_path):
    plain = adapterhub.read(FIXTURES / "bert_houlsby")
    scaled = adapterhub.read(_edited(tmp_path, scaling=0.5, non_linearity="SiLU"))
    assert scaled.components[0].params["non_linearity"] == "swish"
    for name, tensor in plain.tensors.items():
        factor = 0.5 if name.endswith((".up", ".up_bias")) else 1.0
        np.testing.assert_array_equal(scaled.tensors[name], tensor * np.float32(factor))


def test_peft_folders_are_not_taken_for_adapterhub(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    assert not adapterhub.detect(folder)
    assert detect_format(folder) == "peft"
