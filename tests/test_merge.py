"""Merge and unmerge, in memory and streamed through a checkpoint folder, checked against PEFT's merge_and_unload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

import tiny_models
from cli_runner import call_cli, run_cli
from adapterkit import Adapter, AdapterError, BaseModel, Component, Manifest, save
from adapterkit.adapter import tensor_name
from adapterkit.arrays import to_torch
from adapterkit.io.checkpoint import Checkpoint
from adapterkit.merge import merge_into_model, unmerge_from_model
from adapterkit.merge_checkpoint import RECORD_FILE, merge_checkpoint, unmerge_checkpoint

LLAMA_TARGETS = [f"model.layers.{i}.{m}" for i in range(2) for m in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")]
GPT2_TARGETS = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
BERT_TARGETS = [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])


def peft_merged(model, adapter: Adapter, fan_in_fan_out: bool = False):
    """The reference: PEFT with the same A and B, merged by merge_and_unload."""
    component = adapter.components[0]
    config = LoraConfig(r=component.params["rank"], lora_alpha=component.params["alpha"],
                        target_modules=component.targets, fan_in_fan_out=fan_in_fan_out,
                        use_rslora=component.params["scaling"] == "rslora", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for target, roles in adapter.component_tensors(component.name).items():
            modules[target].lora_A["default"].weight.copy_(to_torch(roles["lora_A"]))
            modules[target].lora_B["default"].weight.copy_(to_torch(roles["lora_B"]))
    return peft_model.merge_and_unload()


def output(model):
    with torch.no_grad():
        result = model(input_ids=IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


CASES = {
    "llama": (tiny_models.llama, AutoModelForCausalLM, LLAMA_TARGETS, {}),
    "llama-rslora": (tiny_models.llama, AutoModelForCausalLM, LLAMA_TARGETS[:4], {"scaling": "rslora", "rank": 8}),
    "gpt2-conv1d": (tiny_models.gpt2, AutoModelForCausalLM, GPT2_TARGETS, {"fan_in_fan_out": True}),
    "bert": (tiny_models.bert, AutoModel, BERT_TARGETS, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_streamed_merge_matches_peft_merge_and_unload(case, request, tmp_path):
    build, auto, targets, options = CASES[case]
    base_dir = request.getfixturevalue(f"tiny_{case.split('-')[0]}_dir")
    adapter = tiny_models.random_lora(build(), targets, **options)
    save(adapter, tmp_path / "a.safetensors")
    merge_checkpoint(base_dir, [tmp_path / "a.safetensors"], tmp_path / "merged")
    ours = output(auto.from_pretrained(tmp_path / "merged"))
    reference = output(peft_merged(build(), adapter, options.get("fan_in_fan_out", False)))
    assert not torch.allclose(reference, output(build()), atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    record = json.loads((tmp_path / "merged" / RECORD_FILE).read_text())
    assert [e["weight"] for e in record["merged"]] == [1.0]


def test_sharded_base_gives_sharded_output_with_same_layout(tmp_path):
    base_dir = tmp_path / "base"
    tiny_models.llama().save_pretrained(base_dir, max_shard_size="40KB")
    adapter = tiny_models.random_lora(tiny_models.llama(), LLAMA_TARGETS)
    merge_checkpoint(base_dir, [adapter], tmp_path / "merged")
    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    merged_index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    assert merged_index == base_index and len(set(base_index.values())) > 2
    torch.testing.assert_close(output(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")),
                               output(peft_merged(tiny_models.llama(), adapter)), atol=1e-5, rtol=0)
    # A second adapter for the same base merges onto the merged folder (checked against the recorded base).
    merge_checkpoint(tmp_path / "merged", [adapter], tmp_path / "twice", weights=[-1.0])
    assert len(json.loads((tmp_path / "twice" / RECORD_FILE).read_text())["merged"]) == 2
    for key, tensor in _tensors(base_dir).items():
        torch.testing.assert_close(_tensors(tmp_path / "twice")[key], tensor, atol=1e-6, rtol=0)


def _tensors(folder):
    with Checkpoint(folder) as checkpoint:
        return {name: to_torch(checkpoint.get(name).copy()) for name in checkpoint.names()}


def test_weighted_merge_then_unmerge_restores_float32_checkpoint(tiny_llama_dir, tmp_path):
    first = tiny_models.random_lora(tiny_models.llama(), LLAMA_TARGETS, seed=1)
    second = tiny_models.random_lora(tiny_models.llama(), LLAMA_TARGETS[:3], seed=2, rank=2)
    merge_checkpoint(tiny_llama_dir, [first, second], tmp_path / "merged", weights=[0.7, -0.4])
    # Weighted deltas add: the merged weights equal W + 0.7 ΔW₁ - 0.4 ΔW₂ computed by hand.
    base, merged = _tensors(tiny_llama_dir), _tensors(tmp_path / "merged")
    name = "model.layers.0.self_attn.q_proj"
    def lora(adapter, scale):
        return scale * to_torch(adapter.tensors[f"default.{name}.lora_B"]) @ to_torch(adapter.tensors[f"default.{name}.lora_A"])

    by_hand = base[f"{name}.weight"] + 0.7 * lora(first, 8 / 4) - 0.4 * lora(second, 8 / 2)  # s = alpha / rank
    torch.testing.assert_close(merged[f"{name}.weight"], by_hand, atol=1e-6, rtol=0)
    unmerge_checkpoint(tmp_path / "merged", [first, second], tmp_path / "restored", weights=[0.7, -0.4])
    restored = _tensors(tmp_path / "restored")
    assert restored.keys() == base.keys()
    for key, tensor in base.items():
        torch.testing.assert_close(restored[key], tensor, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "restored" / RECORD_FILE).read_text())["merged"] == []  # nothing left merged


def test_bfloat16_merge_then_unmerge_stays_within_two_roundings(tiny_llama_dir, tmp_path):
    adapter = tiny_models.random_lora(tiny_models.llama(), LLAMA_TARGETS)
    merge_checkpoint(tiny_llama_dir, [adapter], tmp_path / "merged", dtype="bfloat16")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    unmerge_checkpoint(tmp_path / "merged", [adapter], tmp_path / "restored")
    base, merged, restored = (_tensors(p) for p in (tiny_llama_dir, tmp_path / "merged", tmp_path / "restored"))
    for key, tensor in base.items():
        assert restored[key].dtype == torch.bfloat16
        # Bound: bf16 keeps 8 significant bits (unit roundoff u = 2^-8); merge rounds W + ΔW, unmerge rounds
        # (W + ΔW + e₁) - ΔW, so |restored - W| <= u·(|W + ΔW| + |W|)·(1 + 2u).
        bound = 2.0**-8 * (merged[key].float().abs() + tensor.abs()) * (1 + 2.0**-7)
        assert bool(((restored[key].float() - tensor).abs() <= bound).all()), key


def test_in_memory_merge_matches_peft_and_unmerge_restores():
    model = tiny_models.llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = tiny_models.random_lora(model, LLAMA_TARGETS, scaling="rslora")
    merge_into_model(model, [adapter])
    torch.testing.assert_close(output(model), output(peft_merged(tiny_models.llama(), adapter)), atol=1e-5, rtol=0)
    unmerge_from_model(model, [adapter])
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, original[key], atol=1e-6, rtol=0)


def _bitfit_and_head(model) -> Adapter:
    generator = torch.Generator().manual_seed(3)
    target = "encoder.layer.0.attention.self.query"
    tensors = {tensor_name("bias", target, "bias"): torch.randn(32, generator=generator),
               tensor_name("head", "pooler.dense", "weight"): torch.randn(32, 32, generator=generator)}
    manifest = Manifest([Component("bias", "bitfit", [target]), Component("head", "full", ["pooler.dense"])],
                        BaseModel("tiny", None, None))
    return Adapter(manifest, tensors)


def test_bitfit_adds_to_bias_full_replaces_and_full_cannot_be_unmerged():
    model = tiny_models.bert()
    adapter = _bitfit_and_head(model)
    query_bias = model.encoder.layer[0].attention.self.query.bias.detach().clone()
    merge_into_model(model, [adapter], weights=[0.5])
    torch.testing.assert_close(model.encoder.layer[0].attention.self.query.bias,
                               query_bias + 0.5 * to_torch(adapter.tensors["bias.encoder.layer.0.attention.self.query.bias"]))
    assert torch.equal(model.pooler.dense.weight, to_torch(adapter.tensors["head.pooler.dense.weight"]))
    with pytest.raises(AdapterError, match="cannot be unmerged"):
        unmerge_from_model(model, [adapter], weights=[0.5])


def test_target_names_resolve_across_a_wrapper_prefix(tiny_llama_dir, tmp_path):
    # The same adapter, named as on the inner LlamaModel ("layers.0...") instead of LlamaForCausalLM ("model.layers.0").
    adapter = tiny_models.random_lora(tiny_models.llama(), LLAMA_TARGETS[:2])
    renamed = Adapter(copy.deepcopy(adapter.manifest),
                      {k.replace("default.model.", "default."): v for k, v in adapter.tensors.items()})
    renamed.manifest.components[0].targets = [t.removeprefix("model.") for t in LLAMA_TARGETS[:2]]
    merge_checkpoint(tiny_llama_dir, [renamed], tmp_path / "merged")
    merge_checkpoint(tiny_llama_dir, [adapter], tmp_path / "reference")
    assert _tensors(tmp_path / "merged").keys() == _tensors(tmp_path / "reference").keys()
    for key, tensor in _tensors(tmp_path / "reference").items():
        assert torch.equal(_tensors(tmp_path / "merged")[key], tensor)
    renamed.manifest.components[0].targets[0] = "layers.9.self_attn.q_proj"
    renamed.tensors = {k.replace("layers.0.self_attn.q_proj", "layers.9.self_attn.q_proj"): v
                       for k, v in renamed.tensors.items()}
    with pytest.raises(AdapterError, match="layers.9.self_attn.q_proj"):
        merge_checkpoint(tiny_llama_dir, [renamed], tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_refuses_other_base_unless_forced_and_refuses_prefix(tiny_llama_dir, tmp_path):
    other = tiny_models.random_lora(tiny_models.llama(seed=5), LLAMA_TARGETS[:2])  # same shapes, other weights
    save(other, tmp_path / "other.safetensors")
    refused = run_cli("merge", tiny_llama_dir, tmp_path / "other.safetensors", "-o", tmp_path / "out")
    assert refused.returncode == 1 and "another base" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "out").exists()
    forced = run_cli("merge", tiny_llama_dir, tmp_path / "other.safetensors", "-o", tmp_path / "out", "--force")
    assert forced.returncode == 0, forced.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           load_file(tiny_llama_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])
    shown = json.loads(call_cli("inspect", tmp_path / "out", "--json").stdout)
    assert shown["what"] == "merged model"
    assert shown["merged"][0]["sha256"] == other.content_sha256()  # the record names the adapter by its content
    again = run_cli("merge", tiny_llama_dir, tmp_path / "other.safetensors", "-o", tmp_path / "out", "--force")
    assert again.returncode == 1 and "--overwrite" in again.stderr

    prefix = Adapter(Manifest([Component("p", "prefix", ["model.layers.0.self_attn"], {"prefix_length": 2})]),
                     {"p.model.layers.0.self_attn.prefix_key": torch.zeros(2, 2, 8),
                      "p.model.layers.0.self_attn.prefix_value": torch.zeros(2, 2, 8)})
    save(prefix, tmp_path / "prefix.safetensors")
    refused = run_cli("merge", tiny_llama_dir, tmp_path / "prefix.safetensors", "-o", tmp_path / "p")
    assert refused.returncode == 1 and "attach" in refused.stderr and "Traceback" not in refused.stderr

    unmerge = run_cli("unmerge", tmp_path / "out", tmp_path / "prefix.safetensors", "-o", tmp_path / "u")
    assert unmerge.returncode == 1 and RECORD_FILE in unmerge.stderr


def test_deltas_that_fit_no_base_tensor_are_refused_and_nothing_is_written(tiny_llama_dir, tmp_path):
    """Llama's projections have no bias, so a BitFit delta on one has nowhere to land; a LoRA whose shapes belong to
    another module does not fit. Both are refused by name, and no output folder (or temporary one) is left."""
    bias = Adapter(Manifest([Component("b", "bitfit", ["model.layers.0.self_attn.q_proj"])]),
                   {tensor_name("b", "model.layers.0.self_attn.q_proj", "bias"): torch.ones(32)})
    with pytest.raises(AdapterError, match="changes model.layers.0.self_attn.q_proj.bias, which the base does not"):
        merge_checkpoint(tiny_llama_dir, [bias], tmp_path / "bias")
    lora = tiny_models.random_lora(tiny_models.llama(), ["model.layers.0.mlp.down_proj"])
    lora.manifest.components[0].targets = ["model.layers.0.mlp.up_proj"]
    lora.tensors = {k.replace("down_proj", "up_proj"): v for k, v in lora.tensors.items()}
    with pytest.raises(AdapterError, match=r"up_proj'?: the update is \[32, 64\], the base weight \[64, 32\]"):
        merge_checkpoint(tiny_llama_dir, [lora], tmp_path / "lora", force=True)
    assert list(tmp_path.iterdir()) == []
