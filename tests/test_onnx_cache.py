"""The key/value cache graph (export_onnx(..., cache=True)): ONNX Runtime generating token by token through its
cache gives what transformers' generate gives with the adapter attached (LoRA, a prefix, none), and sampling is
reproducible and reduces to greedy when the nucleus holds only the top token."""

from __future__ import annotations

import pytest
import torch

from adapterkit.attach import attach
from adapterkit.onnx.export import export_onnx, load_base
from adapterkit.onnx.runner import Runner
from adapterkit.onnx.verify import verify
from test_mixed_batch import VARIANTS, random_adapter

PROMPTS = [[1, 5, 9, 33, 2], [4, 8, 15, 16, 23, 42, 99, 127, 3, 7, 11]]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    model = load_base(tiny_llama_dir)
    adapters = {"lora": random_adapter("lora", "llama", model, 1, VARIANTS[0]),
                "prefix": random_adapter("prefix", "llama", model, 2, VARIANTS[1])}
    result = export_onnx(tiny_llama_dir, list(adapters.values()), tmp_path_factory.mktemp("cached") / "onnx",
                         merged=False, names=list(adapters), cache=True)
    return result, Runner(result.folder), model, adapters


def test_the_graph_takes_and_returns_the_cache_as_optimum_lays_it_out(exported):
    result, runner, model, _ = exported
    layers = model.config.num_hidden_layers
    inputs = [i["name"] for i in result.description["inputs"]]
    assert inputs == ["input_ids", "attention_mask", "position_ids",
                      *[f"past_key_values.{i}.{p}" for i in range(layers) for p in ("key", "value")]]
    assert runner.output_names == ["logits", *[f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")]]
    assert all(check.passed for check in verify(result)), "a first step's logits must equal torch's"


@pytest.mark.parametrize("adapter", [None, "lora", "prefix"])
def test_greedy_generation_through_the_cache_equals_transformers_generate(exported, adapter):
    _, runner, model, adapters = exported
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad(), attach(model, adapters[adapter]) if adapter else torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert runner.generate(prompt, adapter, NEW_TOKENS) == expected


def test_sampled_generation_is_reproducible_and_a_tiny_nucleus_is_greedy(exported):
    _, runner, _, _ = exported
    prompt = PROMPTS[0]
    sampled = runner.generate(prompt, "lora", NEW_TOKENS, temperature=1.5, seed=3)
    assert sampled == runner.generate(prompt, "lora", NEW_TOKENS, temperature=1.5, seed=3)
    assert sampled != runner.generate(prompt, "lora", NEW_TOKENS), "at temperature 1.5 sampling must leave greedy"
    greedy = runner.generate(prompt, "lora", NEW_TOKENS)
    assert runner.generate(prompt, "lora", NEW_TOKENS, temperature=1.5, top_p=1e-9, seed=3) == greedy


def test_an_adapter_added_at_run_time_generates_as_attached_and_can_be_removed(exported, tmp_path):
    """Without a bank, an adapterkit file added to the running session (folded against the base, handed to ONNX
    Runtime's adapter API) acts as if it had been exported with the graph."""
    from adapterkit.errors import AdapterError
    from adapterkit.io.adapter_file import save

    _, runner, model, _ = exported
    late = random_adapter("lora", "llama", model, 7, VARIANTS[1])
    save(late, tmp_path / "late.safetensors")
    session = runner.session
    runner.add_adapter("late", tmp_path / "late.safetensors")
    prompt = PROMPTS[1]
    ids = torch.tensor([prompt])
    with torch.no_grad(), attach(model, late):
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert runner.generate(prompt, "late", NEW_TOKENS) == expected and runner.session is session
    runner.remove_adapter("late")
    with pytest.raises(AdapterError, match="no adapter 'late'"):
        runner.generate(prompt, "late", NEW_TOKENS)
