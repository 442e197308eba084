"""Bottleneck adapters (kind ``adapter``): the attached output is h + w·(W_up·f(W_down·h + b_down) + b_up) computed by
hand in float64 on Llama, GPT-2 and BERT; detach gives the model back; merge is refused; composition is one wider
adapter, exactly what attaching the inputs side by side gives; the adapter sits after other kinds on its module in
attach and in the ONNX graph alike; the file rules; ``train --method adapter`` through the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import tiny_models
from adapterkit import Adapter, BaseModel, Component, Manifest, fingerprint, load
from adapterkit.adapter import tensor_name
from adapterkit.attach import attach
from adapterkit.compose import compose
from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds import get_kind
from adapterkit.kinds.adapter import NON_LINEARITIES
from adapterkit.kinds.adapter.runtime import activate, output_size
from adapterkit.merge import merge_into_model
from adapterkit.targets import attention_outputs, feedforward_outputs
from adapterkit.train.init import new_components
from cli_runner import call_cli
from test_attach import assert_restored, snapshot

MODELS = {"llama": tiny_models.llama, "gpt2": tiny_models.gpt2, "bert": tiny_models.bert}
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 8, 15, 16, 23, 42, 99, 127]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])

#: f written out in float64, independently of the runtime's functions
BY_HAND = {
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "gelu_new": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "swish": lambda z: z / (1 + torch.exp(-z)),
    "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
    "leakyrelu": lambda z: torch.where(z > 0, z, 0.01 * z),
}


def output(model, mask=MASK) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=IDS, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def houlsby(model) -> list[str]:
    return sorted(attention_outputs(model) + feedforward_outputs(model))


def bottleneck(model, targets, *, size=3, function="relu", weight=1.0, seed=0, name="bn", target_params=None,
               scale=0.3) -> Adapter:
    """A bottleneck adapter with random tensors (all four nonzero, so every term counts) on ``targets``."""
    generator = torch.Generator().manual_seed(seed)
    target_params = target_params or {}
    tensors = {}
    for target in targets:
        d = output_size(model.get_submodule(target))
        b = target_params.get(target, {}).get("bottleneck", size)
        shapes = {"down": (b, d), "down_bias": (b,), "up": (d, b), "up_bias": (d,)}
        for role, shape in shapes.items():
            tensors[tensor_name(name, target, role)] = torch.randn(shape, generator=generator) * scale
    component = Component(name, "adapter", list(targets), {"bottleneck": size, "non_linearity": function},
                          target_params, weight)
    return Adapter(Manifest([component], BaseModel("tiny", None, fingerprint(model))), tensors)


def by_hand(model, adapters, weights=None):
    """The output with ``adapters`` computed in float64 from the formula: on each target's output h,
    h + Σ wᵢ·(Uᵢ·f(Dᵢ·h + cᵢ) + uᵢ), every term reading the same h (forward hooks on the plain model)."""
    weights = weights or [1.0] * len(adapters)
    terms: dict[str, list] = {}
    for adapter, weight in zip(adapters, weights):
        for component in adapter.components:
            for target, roles in adapter.component_tensors(component.name).items():
                held = {role: torch.from_numpy(np.asarray(a, dtype=np.float64)) for role, a in roles.items()}
                terms.setdefault(target, []).append(
                    (held, BY_HAND[component.param(target, "non_linearity")], weight * component.weight))

    def hook(target):
        def add(module, inputs, h):
            out = h.clone()
            for held, f, w in terms[target]:
                z = h @ held["down"].T + held["down_bias"]
                out = out + w * (f(z) @ held["up"].T + held["up_bias"])
            return out
        return add

    handles = [model.get_submodule(t).register_forward_hook(hook(t)) for t in terms]
    try:
        return output(model)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", list(MODELS))
def test_attached_output_is_the_formula_in_float64(name):
    model = MODELS[name]().double()
    targets = houlsby(model)
    functions = dict(zip(targets, NON_LINEARITIES * 2))  # every non-linearity somewhere, per-target overrides
    adapter = bottleneck(model, targets, weight=0.7, function="swish",
                         target_params={t: {"non_linearity": f} for t, f in functions.items()} |
                         {targets[0]: {"non_linearity": "gelu", "bottleneck": 5}})
    adapter.validate()
    base = output(model)
    with attach(model, adapter):
        attached = output(model)
    torch.testing.assert_close(attached, by_hand(model, [adapter]), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(attached, base, atol=1e-3)


@pytest.mark.parametrize("name", list(MODELS))
def test_detach_gives_the_model_back_bit_for_bit_and_merge_is_refused(name):
    model = MODELS[name]()
    before, base = snapshot(model), output(model)
    adapter = bottleneck(model, houlsby(model))
    lora = tiny_models.random_lora(model, attention_outputs(model), fan_in_fan_out=name == "gpt2")
    with attach(model, [adapter, lora, bottleneck(model, feedforward_outputs(model), seed=1, name="other")]):
        assert not torch.allclose(output(model), base, atol=1e-3)
    assert_restored(model, before)
    assert torch.equal(output(model), base)
    with pytest.raises(RequestError, match="attach it"):
        merge_into_model(model, [adapter])
    assert_restored(model, before)


def test_compose_with_weights_equals_attaching_both_with_those_weights():
    model = tiny_models.llama()
    feedforward, both = feedforward_outputs(model), houlsby(model)
    a = bottleneck(model, feedforward, size=2, function="relu", seed=1, name="a")
    a.manifest.components[0].params["placement"] = "pfeiffer"
    b = bottleneck(model, both, size=3, function="relu", weight=0.5, seed=2, name="b")
    b.manifest.components[0].params["placement"] = "houlsby"
    weights = [0.7, -1.3]
    composite = compose([a, b], weights)
    [component] = composite.components
    assert component.kind == "adapter" and component.weight == 1.0
    assert component.params["non_linearity"] == "relu" and component.params["placement"] == "houlsby"
    assert {t: component.param(t, "bottleneck") for t in component.targets} == {
        t: 5 if t in feedforward else 3 for t in both}  # 2 + 3 where both act
    with attach(model, [a, b], weights=weights):
        side_by_side = output(model)
    with attach(model, composite):
        composed = output(model)
    torch.testing.assert_close(composed, side_by_side, atol=1e-5, rtol=1e-5)
    model = model.double()
    expected = by_hand(model, [a, b], weights)
    with attach(model, composite):
        torch.testing.assert_close(output(model), expected, atol=1e-6, rtol=1e-6)


def test_compose_refuses_two_non_linearities_on_one_target_but_attach_runs_them_side_by_side():
    model = tiny_models.gpt2().double()
    targets = feedforward_outputs(model)
    relu = bottleneck(model, targets, function="relu", name="a")
    gelu = bottleneck(model, targets[:1], function="gelu", seed=3, name="b")
    with pytest.raises(RequestError, match="non-linearities disagree"):
        compose([relu, gelu])
    expected = by_hand(model, [relu, gelu], [0.5, 2.0])
    with attach(model, [relu, gelu], weights=[0.5, 2.0]):  # side by side, each on the module's output
        torch.testing.assert_close(output(model), expected, atol=1e-10, rtol=1e-10)


def test_the_adapter_sits_after_other_kinds_on_its_module_whatever_the_order():
    model = tiny_models.llama().double()
    targets = houlsby(model)
    adapter = bottleneck(model, targets)
    lora = tiny_models.random_lora(model, targets)
    with attach(model, [adapter, lora]):
        first = output(model)
    with attach(model, [lora, adapter]):
        second = output(model)
    torch.testing.assert_close(first, second, atol=1e-12, rtol=0)
    with attach(model, lora):  # the reference: the adapter on the output of the LoRA-changed module
        torch.testing.assert_close(first, by_hand(model, [adapter]), atol=1e-10, rtol=1e-10)


def test_unmerged_onnx_graph_with_lora_and_mixed_non_linearities_equals_attach(tmp_path):
    """One file, one module: a LoRA and two adapter components (relu and gelu, one graph input of codes) — the graph
    puts the adapters after the LoRA and side by side, as attach does; no adapter is the base."""
    from adapterkit.onnx.export import export_onnx, load_base
    from adapterkit.onnx.runner import Runner

    tiny_models.llama().save_pretrained(tmp_path / "base")
    model = load_base(tmp_path / "base")
    targets = houlsby(model)
    parts = [tiny_models.random_lora(model, targets, name="low"),
             bottleneck(model, targets, function="relu", name="a", seed=1),
             bottleneck(model, targets[::2], function="gelu", name="b", seed=2, size=2, weight=-0.6)]
    adapter = Adapter(Manifest([c for p in parts for c in p.components], parts[0].manifest.base_model),
                      {k: v for p in parts for k, v in p.tensors.items()})
    adapter.validate()
    export_onnx(tmp_path / "base", [adapter], tmp_path / "onnx", merged=False, names=["a"], weights=[0.8])
    runner = Runner(tmp_path / "onnx")
    inputs = {"input_ids": IDS.numpy(), "attention_mask": MASK.numpy()}
    with attach(model, adapter, weights=[0.8]):
        expected = output(model)
    rows = MASK.bool()
    actual = torch.from_numpy(runner.run(inputs, "a")["logits"])
    torch.testing.assert_close(actual[rows], expected[rows], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(runner.run(inputs)["logits"])[rows], output(model)[rows], atol=1e-4,
                               rtol=0)


def test_codes_select_each_units_function_and_an_unknown_code_gives_nan():
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None].expand(7, len(NON_LINEARITIES) + 1)
    codes = torch.arange(len(NON_LINEARITIES) + 1, dtype=torch.float32)
    out = activate(z, codes)
    for code, name in enumerate(NON_LINEARITIES):
        torch.testing.assert_close(out[:, code], BY_HAND[name](z[:, code]), atol=1e-12, rtol=1e-12)
        assert torch.equal(out[:, code], activate(z, name)[:, code])  # the selection is exact
    assert torch.isnan(out[:, -1]).all()


def _file_with(change) -> Adapter:
    model = tiny_models.llama()
    adapter = bottleneck(model, feedforward_outputs(model)[:1], size=2)
    change(adapter)
    return adapter


@pytest.mark.parametrize("change, problem", [
    (lambda a: a.tensors.update({k: np.zeros((a.tensors[k].shape[0], 3), np.float32)
                                 for k in a.tensors if k.endswith(".up")}), "bottleneck mismatch"),
    (lambda a: a.manifest.components[0].params.update(bottleneck=4), "manifest says bottleneck 4"),
    (lambda a: a.manifest.components[0].params.update(non_linearity="softplus"), "'softplus' is not one of"),
    (lambda a: a.tensors.update({k: np.zeros(5, np.float32) for k in a.tensors if k.endswith(".up_bias")}),
     "size mismatch"),
    (lambda a: a.tensors.update({k: np.zeros((2, 32, 1), np.float32) for k in a.tensors if k.endswith(".down")}),
     "must be 2-D"),
    (lambda a: a.manifest.components[0].params.update(placement=3), "3 is not of type 'string'"),
    (lambda a: a.manifest.components[0].params.update(bottleneck=2.5), "2.5 is not of type 'integer'"),
    (lambda a: a.manifest.components[0].params.pop("non_linearity"), "'non_linearity' is a required property"),
])
def test_file_rules(change, problem):
    # the kind's own check, or the manifest schema's (spec 1.1), which checks the params first
    with pytest.raises(FormatError, match=problem):
        _file_with(change).validate()


def test_houlsby_targets_and_the_reduction_factor():
    model = tiny_models.llama()
    components, tensors = new_components(model, "adapter", targets=["o_proj", "down_proj"],
                                         options={"reduction_factor": 4.0})
    [component] = components
    assert component.params == {"bottleneck": 8, "non_linearity": "relu", "placement": "houlsby"}
    assert sorted(component.targets) == houlsby(model)
    assert all(not t.any() for n, t in tensors.items() if not n.endswith(".down"))  # starts as the base
    components, _ = new_components(model, "adapter")
    assert components[0].params["placement"] == "pfeiffer" and components[0].targets == feedforward_outputs(model)
    assert get_kind("adapter").train_options[0].name == "reduction_factor"


def test_train_method_adapter_through_the_command_line(tmp_path):
    from adapterkit.example import build_example
    from adapterkit.train.base import load_base
    from adapterkit.train.data import load_examples
    from adapterkit.train.evaluate import evaluate

    paths = build_example(tmp_path / "example")
    lines = paths["support_casual"].read_text().splitlines()
    sample = tmp_path / "sample.jsonl"
    sample.write_text("\n".join(lines[::20]) + "\n")
    out = tmp_path / "adapter.safetensors"
    result = call_cli("train", paths["llama"], "--method", "adapter", "--data", paths["support_casual"],
                      "--eval-data", sample, "--steps", "12", "--batch-size", "8", "--reduction-factor", "8",
                      "-o", out)  # the kind's default learning rate
    assert result.returncode == 0, result.stderr
    adapter = load(out)  # validates
    [component] = adapter.components
    assert component.kind == "adapter" and component.params["placement"] == "pfeiffer"
    hidden = json.loads((paths["llama"] / "config.json").read_text())["hidden_size"]
    assert component.params["bottleneck"] == hidden // 8
    assert adapter.manifest.training["lr"] == get_kind("adapter").default_lr
    base = load_base(paths["llama"], "causal-lm")
    examples = load_examples(sample)
    before = evaluate(base.model, base.tokenizer, examples, "causal-lm")["loss"]
    after = adapter.manifest.training["eval"]["loss"]
    assert after < before - 0.05, (before, after)
    with attach(base.model, adapter):
        assert evaluate(base.model, base.tokenizer, examples, "causal-lm")["loss"] == pytest.approx(after, rel=1e-5)
    shown = call_cli("inspect", out)
    assert shown.returncode == 0 and "bottleneck" in shown.stdout and "pfeiffer" in shown.stdout, shown.stdout
