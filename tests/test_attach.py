"""attach / detach of LoRA, BitFit and full adapters, checked against PEFT and against hand-computed values."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import tiny_models
from adapterkit import Adapter, AdapterError, BaseModel, Component, Manifest, fingerprint
from adapterkit.adapter import tensor_name
from adapterkit.arrays import to_torch
from adapterkit.attach import attach
from adapterkit.errors import BaseMismatchError

LLAMA_TARGETS = [f"model.layers.{i}.{m}" for i in range(2) for m in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")]
GPT2_TARGETS = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj")]
BERT_TARGETS = [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 8, 15, 16, 23, 42, 99, 127]])


def output(model):
    with torch.no_grad():
        result = model(input_ids=IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def peft_lora(model, adapter: Adapter, prefix: str = ""):
    """The reference: a PeftModel with the adapter's A and B copied in (targets renamed with ``prefix``)."""
    component = adapter.components[0]
    targets = [prefix + t for t in component.targets]
    config = LoraConfig(r=component.params["rank"], lora_alpha=component.params["alpha"], target_modules=targets,
                        fan_in_fan_out=component.params["fan_in_fan_out"], init_lora_weights=False,
                        use_rslora=component.params["scaling"] == "rslora")
    peft_model = get_peft_model(model, config)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for target, roles in adapter.component_tensors(component.name).items():
            roles = tiny_models.torch_roles(roles)
            layer = modules[prefix + target]
            if isinstance(layer.base_layer, torch.nn.Embedding):
                layer.lora_embedding_A["default"].copy_(roles["lora_A"])
                layer.lora_embedding_B["default"].copy_(roles["lora_B"])
            else:
                layer.lora_A["default"].weight.copy_(roles["lora_A"])
                layer.lora_B["default"].weight.copy_(roles["lora_B"])
    return peft_model


def snapshot(model):
    """Everything detach must give back: tensors bit for bit, and the very same module and parameter objects."""
    return ({name: tensor.clone() for name, tensor in model.state_dict().items()},
            [(name, id(module)) for name, module in model.named_modules()],
            [(name, id(parameter)) for name, parameter in model.named_parameters()])


def assert_restored(model, before):
    tensors, modules, parameters = snapshot(model)
    assert tensors.keys() == before[0].keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, before[0][name]), name
    assert modules == before[1]
    assert parameters == before[2]


CASES = {
    "llama": (tiny_models.llama, LLAMA_TARGETS, {}),
    "llama-rslora": (tiny_models.llama, LLAMA_TARGETS[:4], {"scaling": "rslora", "rank": 8}),
    "llama-embedding": (tiny_models.llama, ["model.embed_tokens"], {"fan_in_fan_out": True}),
    "gpt2-conv1d": (tiny_models.gpt2, GPT2_TARGETS, {"fan_in_fan_out": True}),
    "bert": (tiny_models.bert, BERT_TARGETS, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_lora_matches_peft_and_detach_restores_the_model(case):
    build, targets, options = CASES[case]
    model = build()
    adapter = tiny_models.random_lora(model, targets, **options)
    before, base_output = snapshot(model), output(model)
    reference = output(peft_lora(build(), adapter))
    assert not torch.allclose(reference, base_output, atol=1e-3)  # the adapter does change the output
    with attach(model, adapter) as handle:
        torch.testing.assert_close(output(model), reference, atol=1e-5, rtol=0)
        assert len(handle.tensors) == 2 * len(targets)
    assert_restored(model, before)
    assert torch.equal(output(model), base_output)


def test_targets_of_a_bare_model_resolve_on_a_model_with_a_head():
    model = tiny_models.bert_classifier()
    adapter = tiny_models.random_lora(tiny_models.bert(), BERT_TARGETS)
    adapter.manifest.base_model.fingerprint = fingerprint(model)
    reference = output(peft_lora(tiny_models.bert_classifier(), adapter, prefix="bert."))
    with attach(model, adapter):
        torch.testing.assert_close(output(model), reference, atol=1e-5, rtol=0)


def test_unknown_target_is_an_error_naming_it():
    model = tiny_models.llama()
    adapter = tiny_models.random_lora(model, LLAMA_TARGETS[:1])
    adapter.manifest.components[0].targets = ["model.layers.9.self_attn.q_proj"]
    adapter.tensors = {k.replace("layers.0", "layers.9"): v for k, v in adapter.tensors.items()}
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"model\.layers\.9\.self_attn\.q_proj"):
        attach(model, adapter)
    assert_restored(model, before)


def _linear_adapter(name, layer, rank, alpha, seed, weight=1.0, bias=True):
    """A LoRA (and a BitFit bias delta) component for ``layer``, the module ``0`` of an ``nn.Sequential``."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, layer.in_features, generator=generator)
    b = torch.randn(layer.out_features, rank, generator=generator)
    components = [Component(name, "lora", ["0"], {"rank": rank, "alpha": alpha, "scaling": "standard",
                                                  "fan_in_fan_out": False}, weight=weight)]
    tensors = {tensor_name(name, "0", "lora_A"): a, tensor_name(name, "0", "lora_B"): b}
    if bias:
        components.append(Component(name + "_bias", "bitfit", ["0"], {}, weight=weight))
        tensors[tensor_name(name + "_bias", "0", "bias")] = torch.randn(layer.out_features, generator=generator)
    return Adapter(Manifest(components=components, base_model=BaseModel("linear", None, None)), tensors)


def test_two_adapters_with_weights_give_the_hand_computed_weighted_sum():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    first = _linear_adapter("first", model[0], rank=2, alpha=4.0, seed=1, weight=0.5)
    second = _linear_adapter("second", model[0], rank=3, alpha=3.0, seed=2, bias=False)
    x = torch.randn(4, 6)
    w, b = model[0].weight, model[0].bias

    def delta(adapter, name, s):
        return s * to_torch(adapter.tensors[f"{name}.0.lora_B"]) @ to_torch(adapter.tensors[f"{name}.0.lora_A"])

    # y = x (W + 0.7·0.5·(4/2)·B₁A₁ + (-1.5)·(3/3)·B₂A₂)ᵀ + b + 0.7·0.5·Δb₁
    expected = x @ (w + 0.7 * delta(first, "first", 0.5 * 4 / 2) - 1.5 * delta(second, "second", 3 / 3)).T \
        + b + 0.7 * 0.5 * to_torch(first.tensors["first_bias.0.bias"])
    with torch.no_grad(), attach(model, [first, second], weights=[0.7, -1.5]):
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_bitfit_matches_the_base_with_shifted_biases_and_detaches():
    model = tiny_models.llama()
    generator = torch.Generator().manual_seed(3)
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.norm"]  # no bias, no, norm
    modules = dict(model.named_modules())
    sizes = {t: modules[t].weight.shape[0] for t in targets}
    tensors = {tensor_name("bias", t, "bias"): torch.randn(sizes[t], generator=generator) * 0.1 for t in targets}
    adapter = Adapter(Manifest([Component("bias", "bitfit", targets, {}, weight=2.0)],
                               BaseModel("tiny", None, fingerprint(model))), tensors)
    reference = copy.deepcopy(model)
    reference_modules = dict(reference.named_modules())
    for target in targets:  # the reference: biases made by hand (a Linear without one gets a parameter)
        reference_modules[target].bias = torch.nn.Parameter(2.0 * tensors[tensor_name("bias", target, "bias")])
    reference_modules["model.norm"].forward = (
        lambda x, norm=reference_modules["model.norm"]: type(norm).forward(norm, x) + norm.bias)
    before, base_output = snapshot(model), output(model)
    with attach(model, adapter):
        torch.testing.assert_close(output(model), output(reference), atol=1e-5, rtol=0)
    assert_restored(model, before)
    assert torch.equal(output(model), base_output)


def test_full_replaces_the_task_head_and_detach_restores_it():
    model = tiny_models.bert_classifier()
    generator = torch.Generator().manual_seed(4)
    head = {"weight": torch.randn(2, 32, generator=generator), "bias": torch.randn(2, generator=generator)}
    adapter = Adapter(Manifest([Component("head", "full", ["classifier"], {})],
                               BaseModel("tiny", None, fingerprint(model, exclude=["classifier"]))),
                      {tensor_name("head", "classifier", k): v for k, v in head.items()})
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.classifier.weight.copy_(head["weight"])
        reference.classifier.bias.copy_(head["bias"])
    before, base_output = snapshot(model), output(model)
    with attach(model, adapter) as handle:
        torch.testing.assert_close(output(model), output(reference), atol=1e-6, rtol=0)
        assert model.classifier.weight is handle.tensors["0/head.classifier.weight"]
    assert_restored(model, before)
    assert torch.equal(output(model), base_output)


def test_fingerprint_mismatch_is_refused_unless_forced(caplog):
    adapter = tiny_models.random_lora(tiny_models.llama(seed=0), LLAMA_TARGETS[:2])
    other = tiny_models.llama(seed=1)
    before = snapshot(other)
    with pytest.raises(BaseMismatchError,
                       match=r"made for another base model \(fingerprint fp\d:\w+, this base is fp\d:\w+\); pass --force"):
        attach(other, adapter)
    assert_restored(other, before)
    with attach(other, adapter, force=True):
        assert not torch.equal(output(other), output(tiny_models.llama(seed=1)))
    adapter.manifest.base_model.fingerprint = None
    with caplog.at_level(logging.WARNING, logger="adapterkit.attach"), attach(other, adapter):
        pass
    assert "no base fingerprint" in caplog.text


def test_training_updates_only_the_adapter_and_to_adapters_returns_the_new_values():
    model = tiny_models.llama()
    model.requires_grad_(False)
    adapter = tiny_models.random_lora(model, LLAMA_TARGETS[:2])
    original = {k: v.copy() for k, v in adapter.tensors.items()}
    before = snapshot(model)
    with attach(model, adapter, trainable=True) as handle:
        optimizer = torch.optim.SGD(list(handle.parameters()), lr=0.1)
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        trained = handle.to_adapters()[0]
    assert_restored(model, before)
    for name, tensor in adapter.tensors.items():
        assert np.array_equal(tensor, original[name])  # the input adapter is untouched
        assert not np.array_equal(trained.tensors[name], tensor)  # every tensor got a gradient step
        assert isinstance(trained.tensors[name], np.ndarray) and trained.tensors[name].dtype == tensor.dtype
    assert trained.manifest.to_json() == adapter.manifest.to_json()
    with attach(model, trained):  # the trained adapter is what ran at the end
        trained_output = output(model)
    with attach(model, adapter, trainable=True) as handle:
        with torch.no_grad():
            for key, parameter in handle.tensors.items():
                parameter.copy_(to_torch(trained.tensors[key.partition("/")[2]]))
        torch.testing.assert_close(output(model), trained_output, atol=0, rtol=0)


def test_attached_lora_exports_with_torch_export():
    model = tiny_models.gpt2()
    adapter = tiny_models.random_lora(model, GPT2_TARGETS, fan_in_fan_out=True)
    with attach(model, adapter) as handle:
        program = torch.export.export(model, (), {"input_ids": IDS, "use_cache": False})
        exported = program.module()(input_ids=IDS, use_cache=False).logits
        torch.testing.assert_close(exported, output(model), atol=1e-5, rtol=0)
        names = set(program.graph_signature.parameters)
        assert set(handle.parameter_names().values()) <= names


def test_a_second_attach_stacks_on_the_first_and_detaches_in_reverse_order():
    model = tiny_models.llama()
    first = tiny_models.random_lora(model, LLAMA_TARGETS[:3], seed=1)
    second = tiny_models.random_lora(model, LLAMA_TARGETS[1:4], seed=2)
    with attach(model, [first, second]):
        reference = output(model)
    before = snapshot(model)
    outer = attach(model, first)
    inner = attach(model, second)  # the base fingerprint is still found under the first adapter's wrappers
    torch.testing.assert_close(output(model), reference, atol=1e-6, rtol=0)
    inner.detach()
    outer.detach()
    assert_restored(model, before)
