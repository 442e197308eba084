"""attach / detach of prefix tuning, checked against PEFT's PrefixTuningConfig models (which feed the prefix to the
model as past key/values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model

import tiny_models
from adapterkit import Adapter, AdapterError, Component, Manifest
from adapterkit.attach import attach
from adapterkit.converters import peft as peft_format
from adapterkit.merge import merge_into_model
from test_attach import assert_restored, snapshot

PREFIX_LENGTH = 3
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 8, 15, 16, 23, 42, 99, 127]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])  # the second row is left-padded

CASES = {  # model, PEFT task type, attention module of layer i, model output
    "llama": (tiny_models.llama, TaskType.CAUSAL_LM, "model.layers.{}.self_attn", "logits"),
    "gpt2": (tiny_models.gpt2, TaskType.CAUSAL_LM, "transformer.h.{}.attn", "logits"),
    "bert": (tiny_models.bert, TaskType.FEATURE_EXTRACTION, "encoder.layer.{}.attention.self", "last_hidden_state"),
}


def peft_prefix_model(build, task_type):
    """A PEFT prefix-tuning model with a random prefix (its prompt encoder is a plain embedding)."""
    peft_model = get_peft_model(build(), PrefixTuningConfig(task_type=task_type, num_virtual_tokens=PREFIX_LENGTH))
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(5)))
    return peft_model.eval()


def adapter_from_peft(peft_model, base_model, folder) -> Adapter:
    """Our prefix adapter for PEFT's, made the way a user makes it: PEFT saves its folder, our converter reads it
    (finding the attention modules on the saved base)."""
    base_model.save_pretrained(folder / "base")
    peft_model.save_pretrained(folder / "peft")
    return peft_format.read(folder / "peft", base=folder / "base")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_prefix_matches_peft_and_detach_restores_the_model(case, implementation, tmp_path):
    build, task_type, module_name, field = CASES[case]
    peft_model = peft_prefix_model(build, task_type)
    model = build()
    model.set_attn_implementation(implementation)
    adapter = adapter_from_peft(peft_model, model, tmp_path)
    assert adapter.components[0].targets == [module_name.format(i) for i in range(2)]  # the modules PEFT feeds
    with torch.no_grad():
        reference = getattr(peft_model(input_ids=IDS, attention_mask=MASK), field)
        reference_unmasked = getattr(peft_model(input_ids=IDS), field)
        before, base_output = snapshot(model), getattr(model(input_ids=IDS, attention_mask=MASK), field)
        assert not torch.allclose(reference, base_output, atol=1e-3)
        with attach(model, adapter):
            assert model.config._attn_implementation != implementation
            torch.testing.assert_close(getattr(model(input_ids=IDS, attention_mask=MASK), field)[MASK.bool()],
                                       reference[MASK.bool()], atol=1e-5, rtol=0)
            torch.testing.assert_close(getattr(model(input_ids=IDS), field), reference_unmasked, atol=1e-5, rtol=0)
        assert model.config._attn_implementation == implementation
        assert_restored(model, before)
        assert torch.equal(getattr(model(input_ids=IDS, attention_mask=MASK), field), base_output)


def test_prefix_cannot_be_weighted(tmp_path):
    peft_model = peft_prefix_model(tiny_models.llama, TaskType.CAUSAL_LM)
    model = tiny_models.llama()
    adapter = adapter_from_peft(peft_model, model, tmp_path)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="cannot be weighted"):
        attach(model, adapter, weights=[0.5])
    assert_restored(model, before)
    assert model.config._attn_implementation == "sdpa"


def test_lora_and_prefix_attach_together_and_export(tmp_path):
    """PEFT cannot hold LoRA and a prefix in one model; the reference is PEFT's prefix model on a base into which
    the LoRA was merged."""
    peft_model = peft_prefix_model(tiny_models.llama, TaskType.CAUSAL_LM)
    model = tiny_models.llama()
    prefix = adapter_from_peft(peft_model, model, tmp_path)
    lora = tiny_models.random_lora(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
    merge_into_model(peft_model.get_base_model(), [lora])
    inputs = {"input_ids": IDS, "attention_mask": MASK, "use_cache": False}
    with torch.no_grad():
        reference = peft_model(input_ids=IDS, attention_mask=MASK).logits[MASK.bool()]
        with attach(model, [lora, prefix]) as handle:
            torch.testing.assert_close(model(**inputs).logits[MASK.bool()], reference, atol=1e-5, rtol=0)
            program = torch.export.export(model, (), inputs)
            torch.testing.assert_close(program.module()(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
            assert set(handle.parameter_names().values()) <= set(program.graph_signature.parameters)


def test_two_prefixes_attach_as_their_concatenation(tmp_path):
    peft_model = peft_prefix_model(tiny_models.llama, TaskType.CAUSAL_LM)
    model = tiny_models.llama()
    first = adapter_from_peft(peft_model, model, tmp_path)
    second = Adapter(first.manifest, {k: np.flip(v, axis=1) * 0.5 for k, v in first.tensors.items()})
    joined = Adapter(Manifest([Component("prefix", "prefix", first.components[0].targets,
                                         {"prefix_length": 2 * PREFIX_LENGTH})], first.manifest.base_model),
                     {k: np.concatenate([v, second.tensors[k]], axis=1) for k, v in first.tensors.items()})
    with torch.no_grad():
        with attach(model, joined):
            reference = model(input_ids=IDS, attention_mask=MASK).logits
        with attach(model, [first, second]):
            torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, reference, atol=1e-6, rtol=0)


def test_generate_with_a_cache_follows_peft_greedy_decoding(tmp_path):
    """generate() runs the prefix with a KV cache (our prefix stays out of it). Reference: greedy decoding with PEFT's
    forward on the whole sequence each step (with peft 0.21 / transformers 5.24, PEFT's own generate picks other tokens
    than its forward from the first step on, so it is not used)."""
    peft_model = peft_prefix_model(tiny_models.llama, TaskType.CAUSAL_LM)
    model = tiny_models.llama()
    adapter = adapter_from_peft(peft_model, model, tmp_path)
    with torch.no_grad():
        expected = IDS
        for _ in range(4):
            expected = torch.cat([expected, peft_model(input_ids=expected).logits[:, -1:].argmax(-1)], dim=1)
        with attach(model, adapter):
            generated = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4,
                                       do_sample=False)
    assert torch.equal(generated, expected)


def test_a_prefix_on_a_module_no_attention_call_reads_is_refused():
    """BERT's ``attention`` holds the module that calls attention (``attention.self``) but does not call it itself:
    a prefix there would be read by nothing (the bug of an earlier converter), so attach refuses it by name."""
    from adapterkit.errors import RequestError

    model = tiny_models.bert()
    targets = [f"encoder.layer.{i}.attention" for i in range(2)]
    shape = (4, PREFIX_LENGTH, 8)
    adapter = Adapter(Manifest([Component("prefix", "prefix", targets, {"prefix_length": PREFIX_LENGTH})]),
                      {f"prefix.{t}.{role}": np.ones(shape, np.float32) for t in targets
                       for role in ("prefix_key", "prefix_value")})
    before = snapshot(model)
    with pytest.raises(RequestError, match=r"encoder\.layer\.0\.attention' \(BertAttention\) does not call the "
                                           r"attention function"):
        attach(model, adapter)
    assert_restored(model, before)
    assert model.config._attn_implementation == "sdpa"
