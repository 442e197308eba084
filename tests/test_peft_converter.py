"""The PEFT converter: PEFT folders read into adapters that act like PEFT does, and written back so that PEFT loads
them unchanged and gives the same outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model

import tiny_models
from adapterkit import AdapterError, load, save
from adapterkit.arrays import to_torch
from adapterkit.converters import peft as peft_format
from adapterkit.merge import merge_into_model

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model, names_containing: str, seed: int = 7) -> None:
    """Give the trainable tensors whose name contains ``names_containing`` random values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if names_containing in name and parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def round_trip(peft_model, build, tmp_path, base=None):
    """PEFT folder -> our adapter (saved and reloaded) -> PEFT folder loaded by PeftModel.from_pretrained."""
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = peft_format.read(tmp_path / "peft", base=base)
    save(adapter, tmp_path / "ours.safetensors")
    peft_format.write(load(tmp_path / "ours.safetensors"), tmp_path / "back", base=base)
    return adapter, PeftModel.from_pretrained(build(), tmp_path / "back").eval()


def test_lora_with_patterns_rslora_and_embedding_round_trips(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_model = get_peft_model(tiny_models.llama(), config).eval()
    reference = logits(peft_model)
    adapter, reloaded = round_trip(peft_model, tiny_models.llama, tmp_path)
    component = adapter.component("lora")
    assert component.params["scaling"] == "rslora"
    assert component.target_params["model.layers.1.self_attn.q_proj"] == {"rank": 2}
    assert component.target_params["model.layers.0.self_attn.v_proj"] == {"alpha": 3}
    assert component.target_params["model.embed_tokens"] == {"fan_in_fan_out": True}
    # Our reading of it, merged with our own merge, acts as PEFT does.
    torch.testing.assert_close(logits(merge_into_model(tiny_models.llama(), [adapter])), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(reloaded), reference, atol=1e-6, rtol=0)
    # Written portably: one alpha (the most common α·√r, 8·√4 = 16), no alpha_pattern, no rsLoRA; the other
    # targets' scales folded into B (v_proj: 3·√4 / 16; layer 1's q_proj: 8·√2 / 16), so that a reader that ignores
    # alpha_pattern, rank_pattern and use_rslora (llama.cpp's convert_lora_to_gguf.py) gets the same ΔW.
    written = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
    assert written["use_rslora"] is False and written["alpha_pattern"] == {} and written["lora_alpha"] == 16
    assert_portable(tmp_path / "back", adapter)


def assert_portable(folder, adapter):
    """Each target's ΔW computed as a reader that knows only ``lora_alpha`` and the tensors' ranks does (α/r·B·A)
    equals the adapter's own ΔW (what merge adds)."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    component = adapter.components[0]
    for target, roles in adapter.component_tensors(component.name).items():
        key = peft_format.KEY_PREFIX + target
        a = tensors.get(f"{key}.lora_A.weight", tensors.get(f"{key}.lora_embedding_A"))
        b = tensors.get(f"{key}.lora_B.weight", tensors.get(f"{key}.lora_embedding_B"))
        naive = config["lora_alpha"] / a.shape[0] * torch.from_numpy(b).double() @ torch.from_numpy(a).double()
        expected = tiny_models.merged_delta(component, target, roles).double()
        if component.param(target, "fan_in_fan_out", False):
            expected = expected.T
        torch.testing.assert_close(naive, expected, atol=1e-6, rtol=1e-6)


def test_gpt2_conv1d_fan_in_fan_out_round_trips(tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, fan_in_fan_out=True, init_lora_weights=False,
                        target_modules=["c_attn", "c_fc"])
    peft_model = get_peft_model(tiny_models.gpt2(), config).eval()
    adapter, reloaded = round_trip(peft_model, tiny_models.gpt2, tmp_path)
    assert adapter.component("lora").params["fan_in_fan_out"] is True
    torch.testing.assert_close(logits(merge_into_model(tiny_models.gpt2(), [adapter])), logits(peft_model),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_modules_to_save_and_trained_biases_round_trip_through_the_base(bias, tmp_path):
    tiny_models.bert_classifier().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["query", "value"],
                        modules_to_save=["classifier"], bias=bias)
    peft_model = get_peft_model(tiny_models.bert_classifier(), config).eval()
    randomize(peft_model, "bias")
    randomize(peft_model, "modules_to_save", seed=8)
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterError, match="--base"):
        peft_format.read(tmp_path / "peft")
    adapter, reloaded = round_trip(peft_model, tiny_models.bert_classifier, tmp_path, base=tmp_path / "base")
    assert sorted(c.kind for c in adapter.components) == ["bitfit", "full", "lora"]
    assert adapter.component("saved_modules").targets == ["classifier"]
    assert adapter.manifest.base_model.fingerprint is not None
    # Δb = trained - base: merging our BitFit + full + LoRA into the base reproduces PEFT's model.
    ours = merge_into_model(tiny_models.bert_classifier(), [adapter])
    torch.testing.assert_close(logits(ours), logits(peft_model), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=1e-6, rtol=0)


def test_prefix_tuning_layout_matches_peft_get_prompt_and_round_trips(tiny_llama_dir, tmp_path):
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft_model = get_peft_model(tiny_models.llama(), config).eval()
    randomize(peft_model, "prompt_encoder")
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterError, match="--base"):
        peft_format.read(tmp_path / "peft")
    adapter, reloaded = round_trip(peft_model, tiny_models.llama, tmp_path, base=tiny_llama_dir)
    component = adapter.component("prefix")
    assert component.targets == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    cache = peft_model.get_prompt(batch_size=1)
    for i, target in enumerate(component.targets):  # PEFT's own reading of its tensor, layer by layer
        assert torch.equal(to_torch(adapter.tensors[f"prefix.{target}.prefix_key"]), cache.layers[i].keys[0])
        assert torch.equal(to_torch(adapter.tensors[f"prefix.{target}.prefix_value"]), cache.layers[i].values[0])
    torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=1e-6, rtol=0)


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", "from adapterkit.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_convert_both_ways_and_refuses_pickle(tmp_path):
    peft_model = get_peft_model(tiny_models.llama(), LoraConfig(r=2, target_modules=["q_proj"],
                                                                init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    assert run_cli("convert", tmp_path / "peft", "-o", tmp_path / "a.safetensors").returncode == 0
    result = run_cli("convert", tmp_path / "a.safetensors", "--to", "peft", "-o", tmp_path / "back")
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "back")),
                               logits(peft_model), atol=1e-6, rtol=0)

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    refused = run_cli("convert", tmp_path / "pickled", "-o", tmp_path / "x.safetensors")
    assert refused.returncode == 1 and "pickle" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()
