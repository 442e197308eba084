"""The families users run, each against PEFT: default targets found from the structure, LoRA converted, attached and
merged, a prefix where the family reads one (sliding windows included), training with every method's defaults, and
the unmerged ONNX graph. What a family cannot take is refused in one line (a prefix on Falcon, which computes
attention itself; an encoder-decoder export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model

import families
from adapterkit.attach import attach
from adapterkit.converters import peft as peft_format
from adapterkit.errors import AdapterError
from adapterkit.example import word_tokenizer
from adapterkit.kinds import get_kind, trainable_kinds
from adapterkit.merge import merge_into_model
from adapterkit.train.init import choose_targets
from adapterkit.train.loop import TrainConfig, train

IDS = torch.tensor([[3, 5, 9, 33, 2, 77, 100, 4, 11, 12, 13, 14], [4, 8, 15, 16, 23, 42, 99, 127, 5, 6, 7, 8]])
MASK = torch.ones_like(IDS)
DECODERS = [f for f in families.FAMILIES if f not in families.ENCODERS]
TEXTS = ["the order is late", "a refund for the invoice", "the password is reset", "we look into it today"] * 4


def output(model) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=IDS, attention_mask=MASK)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family saved with a word-level tokenizer, and a small data file."""
    root = tmp_path_factory.mktemp("families")
    tokenizer = word_tokenizer(TEXTS, classifier=False)
    for family in families.FAMILIES:
        families.build(family).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    with open(root / "data.jsonl", "w") as handle:
        handle.writelines(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS))
    return root


def converted(peft_model, family: str, folders, name: str):
    """Our adapter for a PEFT model, through the real converter (PEFT saves, we read)."""
    peft_model.save_pretrained(folders / f"{family}-{name}")
    return peft_format.read(folders / f"{family}-{name}", base=folders / family)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_lora_on_default_targets_converts_attaches_and_merges_as_peft(family, folders):
    model = families.build(family)
    targets = choose_targets(model, "lora", None)
    assert targets, family
    peft_model = get_peft_model(families.build(family), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   init_lora_weights=False)).eval()
    reference = output(peft_model)
    assert not torch.allclose(reference, output(model), atol=1e-4)
    adapter = converted(peft_model, family, folders, "lora")
    with attach(model, adapter):
        torch.testing.assert_close(output(model), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(output(merge_into_model(model, [adapter])), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_prefix_matches_peft_or_is_refused(family, folders):
    model = families.build(family)
    task = TaskType.CAUSAL_LM if family in DECODERS else TaskType.FEATURE_EXTRACTION
    if family == "distilbert":
        pytest.skip("PEFT has no prefix tuning for DistilBERT (it asks for a token_dim its config lacks)")
    peft_model = get_peft_model(families.build(family), PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(5)))
    if not get_kind("prefix").runtime.candidates(model, ()):  # the family computes attention itself
        with pytest.raises(AdapterError, match="call the attention function"):
            converted(peft_model.eval(), family, folders, "prefix")
        return
    adapter = converted(peft_model.eval(), family, folders, "prefix")
    with attach(model, adapter):  # 12 tokens + 3 prefix positions: past the window of 8 where there is one
        torch.testing.assert_close(output(model), output(peft_model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_every_method_trains_with_its_defaults(family, folders):
    """Decoders as causal LMs, encoders as classifiers (a new head, whose checkpoint may lack a pooler)."""
    task = "causal-lm" if family in DECODERS else "classify"
    trained = []
    for method in trainable_kinds():
        if not get_kind(method).runtime.default_targets(families.build(family), ()):
            continue  # a prefix where no attention call reads one: refused, see the next test
        config = TrainConfig(method, task, str(folders / "data.jsonl"), steps=2, batch_size=4)
        result = train(folders / family, config, progress=False)
        result.adapter.validate()
        assert result.steps == 2 and result.adapter.components[0].targets, (family, method)
        trained.append(method)
    assert "lora" in trained and "bitfit" in trained


def test_a_prefix_is_refused_where_no_attention_call_reads_it(folders):
    with pytest.raises(AdapterError, match="no module of this model can take prefix"):
        train(folders / "falcon", TrainConfig("prefix", "causal-lm", str(folders / "data.jsonl"), steps=1,
                                              batch_size=4), progress=False)


#: the decoders whose graphs differ in what the export must handle: plain (llama), a sliding window and softcapping
#: (gemma2), fused projections (phi3), q/k norms (qwen3), multi-query (falcon); the others trace as one of these
ONNX_FAMILIES = ["llama", "gemma2", "phi3", "qwen3", "falcon"]


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_unmerged_onnx_graph_matches_peft(family, folders, tmp_path):
    from adapterkit.onnx.export import export_onnx
    from adapterkit.onnx.runner import Runner

    model = families.build(family)
    peft_model = get_peft_model(families.build(family), LoraConfig(
        r=4, lora_alpha=8, target_modules=choose_targets(model, "lora", None), init_lora_weights=False)).eval()
    adapter = converted(peft_model, family, folders, "onnx-lora")
    export_onnx(folders / family, [adapter], tmp_path / "onnx", merged=False, names=["lora"])
    runner = Runner(tmp_path / "onnx")
    inputs = {"input_ids": IDS.numpy(), "attention_mask": MASK.numpy()}
    np.testing.assert_allclose(runner.run(inputs, "lora")["logits"], output(peft_model).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(runner.run(inputs)["logits"], output(model).numpy(), atol=1e-4, rtol=0)


def test_an_encoder_decoder_export_is_refused_in_one_line(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from adapterkit.onnx.export import load_base

    T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
                               ).save_pretrained(tmp_path / "t5")
    with pytest.raises(AdapterError, match="encoder-decoder model"):
        load_base(tmp_path / "t5")


def test_peft_loads_what_we_write_for_every_family(folders, tmp_path):
    """What `convert --to peft` writes loads in PEFT with the same logits (the LoRA of the first test, written back)."""
    for family in ("qwen2", "phi3", "gpt_neox", "falcon"):
        model = families.build(family)
        peft_model = get_peft_model(families.build(family), LoraConfig(
            r=4, lora_alpha=8, target_modules=choose_targets(model, "lora", None), init_lora_weights=False)).eval()
        adapter = converted(peft_model, family, folders, "back")
        peft_format.write(adapter, tmp_path / family, base=folders / family)
        reloaded = PeftModel.from_pretrained(families.build(family), tmp_path / family).eval()
        torch.testing.assert_close(output(reloaded), output(peft_model), atol=1e-6, rtol=0)


def test_t5_lora_attaches_and_merges_as_peft(tmp_path):
    """An encoder-decoder cannot be exported, but its LoRA converts, attaches and merges like PEFT's."""
    from transformers import T5Config, T5ForConditionalGeneration

    def build():
        torch.manual_seed(0)
        return T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=4)).eval()

    model = build()
    model.save_pretrained(tmp_path / "t5")
    targets = choose_targets(model, "lora", None)
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                    init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = peft_format.read(tmp_path / "peft", base=tmp_path / "t5")

    def logits(m):
        with torch.no_grad():
            return m(input_ids=IDS, decoder_input_ids=IDS[:, :5]).logits

    reference = logits(peft_model)
    with attach(model, adapter):
        torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(merge_into_model(model, [adapter])), reference, atol=1e-5, rtol=0)
