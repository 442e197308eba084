"""(IA)³: attached, merged and converted adapters act as PEFT's IA3 does (Llama, GPT-2 and BERT: output and
feed-forward vectors, Linear and Conv1D layouts, with and without biases); unmerge undoes merge or refuses; compose
is PEFT's weighted sum with 1 for an input that leaves a module alone; ``train --method ia3`` works through the
registry."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.ia3.model import IA3Model

import tiny_models
from adapterkit import Adapter, BaseModel, Component, Manifest, load
from adapterkit.attach import attach
from adapterkit.cli import cli
from adapterkit.compose import compose
from adapterkit.converters import peft as peft_format
from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds import KINDS
from adapterkit.kinds.ia3 import peft as ia3_peft
from adapterkit.merge import merge_into_model, unmerge_from_model

MODELS = tiny_models.MODELS
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 8, 15, 16, 23, 42, 99, 127]])


def output(model) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def peft_ia3(name: str, seed: int = 3, **config):
    """PEFT's IA3 model on a tiny model (PEFT's default targets unless given), its vectors randomised around 1."""
    model = get_peft_model(MODELS[name](), IA3Config(**config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "ia3_l" in parameter_name:
                parameter.copy_(1 + torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, tiny_dirs, tmp_path_factory):
    """(model name, PEFT's output, our reading of PEFT's saved folder)."""
    name = request.param
    peft_model = peft_ia3(name)
    folder = tmp_path_factory.mktemp(f"peft_{name}")
    peft_model.save_pretrained(folder)
    return name, output(peft_model), peft_format.read(folder, base=tiny_dirs[name])


def test_converted_peft_folder_attached_acts_as_peft(converted):
    name, expected, adapter = converted
    component = adapter.component("ia3")
    flagged = {t for t in component.targets if component.param(t, "feedforward")}
    assert flagged and flagged != set(component.targets)
    assert all(re.search(r"(down_proj|mlp\.c_proj|output\.dense)$", t) for t in flagged)
    assert all(component.param(t, "fan_in_fan_out") == (name == "gpt2") for t in component.targets)
    model = MODELS[name]()
    with attach(model, adapter):
        torch.testing.assert_close(output(model), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(output(model), expected, atol=1e-3)  # detached: the base again


def test_merge_equals_attach_and_unmerge_restores_the_base(converted):
    name, expected, adapter = converted
    model = MODELS[name]()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merge_into_model(model, [adapter])  # Llama has no biases to scale: only the weights change
    torch.testing.assert_close(output(model), expected, atol=1e-5, rtol=0)
    unmerge_from_model(model, [adapter])
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, base[key], atol=1e-6, rtol=1e-6)


def test_two_adapters_multiply_when_attached_and_merged(converted):
    name, _, adapter = converted
    model = MODELS[name]()
    with attach(model, [adapter, adapter], weights=[0.5, 1.5]):
        attached = output(model)
    merged = output(merge_into_model(MODELS[name](), [adapter, adapter], [0.5, 1.5]))
    torch.testing.assert_close(merged, attached, atol=1e-5, rtol=0)
    squared = adapter_with(adapter, lambda v: v * v * 0.75)
    with attach(model, squared):
        torch.testing.assert_close(output(model), attached, atol=1e-5, rtol=0)


def adapter_with(adapter: Adapter, change) -> Adapter:
    """A copy of ``adapter`` whose vectors are ``change(vector)``."""
    return Adapter(Manifest([adapter.component("ia3")], adapter.manifest.base_model),
                   {k: change(v.astype(np.float32)) for k, v in adapter.tensors.items()})


def test_unmerge_refuses_a_vector_with_a_zero(converted):
    name, _, adapter = converted
    zeroed = adapter_with(adapter, lambda v: np.where(np.arange(v.size) == 0, 0, v).astype(np.float32))
    model = merge_into_model(MODELS[name](), [zeroed])
    with pytest.raises(RequestError, match="holds a zero.*cannot be unmerged"):
        unmerge_from_model(model, [zeroed])


def test_written_peft_folder_loads_in_peft_with_the_same_output(converted, tiny_dirs, tmp_path):
    name, _, adapter = converted
    weighted = Adapter(Manifest([Component(**{**vars(adapter.component("ia3")), "weight": 0.8})],
                                adapter.manifest.base_model), adapter.tensors)
    model = MODELS[name]()
    with attach(model, weighted):
        expected = output(model)
    peft_format.write(weighted, tmp_path / "peft", base=tiny_dirs[name])
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "peft").eval()
    torch.testing.assert_close(output(loaded), expected, atol=1e-5, rtol=0)
    # read back without the base: the layout comes from the config (PEFT writes fan_in_fan_out for Conv1D)
    back = peft_format.read(tmp_path / "peft")
    assert back.component("ia3").params == adapter.component("ia3").params
    assert back.component("ia3").target_params == adapter.component("ia3").target_params


def test_compose_is_peft_weighted_sum_where_targets_agree(tmp_path):
    a, b = peft_ia3("llama", seed=1), peft_ia3("llama", seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    reference = PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "a", adapter_name="a").eval()
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.3, 0.9], "mix")
    reference.set_adapter("mix")
    composite = compose([peft_format.read(tmp_path / "a"), peft_format.read(tmp_path / "b")], [0.3, 0.9])
    model = tiny_models.llama()
    with attach(model, composite):
        torch.testing.assert_close(output(model), output(reference), atol=1e-5, rtol=0)


def small(targets: dict[str, tuple[list[float], bool]], weight: float = 1.0, name: str = "ia3") -> Adapter:
    """An (IA)³ adapter from {target: (vector, feedforward)}."""
    component = Component(name, "ia3", list(targets), {"feedforward": False},
                          {t: {"feedforward": True} for t, (_, ff) in targets.items() if ff}, weight)
    return Adapter(Manifest([component], BaseModel()),
                   {f"{name}.{t}.ia3_l": np.array(v, np.float32) for t, (v, _) in targets.items()})


def test_compose_counts_an_absent_vector_as_ones():
    a = small({"k": ([2.0, 4.0], False), "ff": ([3.0], True)}, weight=0.5)  # acts with 0.5·l
    b = small({"k": ([1.0, 0.0], False), "v": ([5.0], False)})
    composite = compose([a, b], [0.25, 0.75])
    tensors = composite.component_tensors("composed")
    np.testing.assert_allclose(tensors["k"]["ia3_l"], [0.25 * 1 + 0.75 * 1, 0.25 * 2 + 0])
    np.testing.assert_allclose(tensors["ff"]["ia3_l"], [0.25 * 1.5 + 0.75])  # b leaves ff alone: its vector is 1
    np.testing.assert_allclose(tensors["v"]["ia3_l"], [0.25 + 0.75 * 5])
    component = composite.component("composed")
    assert [component.param(t, "feedforward") for t in ("k", "ff", "v")] == [False, True, False]


def test_compose_refuses_input_and_output_vectors_on_one_target():
    with pytest.raises(RequestError, match="scales its output but .* its input"):
        compose([small({"k": ([1.0], False)}), small({"k": ([1.0], True)})])


def test_format_rules():
    with pytest.raises(FormatError, match="ia3_l must be 1-D"):
        Adapter(Manifest([Component("c", "ia3", ["k"], {})], BaseModel()),
                {"c.k.ia3_l": np.ones((2, 1), np.float32)}).validate()
    with pytest.raises(FormatError, match="is not of type 'boolean'"):
        Adapter(Manifest([Component("c", "ia3", ["k"], {}, {"k": {"feedforward": "yes"}})], BaseModel()),
                {"c.k.ia3_l": np.ones(2, np.float32)}).validate()


def test_peft_suffix_rule_is_kept_where_one_name_ends_another():
    """PEFT tests feedforward_modules entries as bare suffixes: ``a.b`` would also flag ``x.a.b``."""
    adapter = small({"a.b": ([1.0], True), "x.a.b": ([1.0], False), "c": ([1.0], True)})
    config = ia3_peft.empty_config()
    ia3_peft.write(adapter.component("ia3"), adapter.component_tensors("ia3"), config, {})
    peft_config = IA3Config(target_modules=config["target_modules"], feedforward_modules=config["feedforward_modules"])
    assert {t: IA3Model._check_target_module_feedforward(peft_config, t) for t in ("a.b", "x.a.b", "c")} == \
        {"a.b": True, "x.a.b": False, "c": True}


def test_train_method_ia3_through_the_cli(example, tmp_path):  # noqa: F811
    from adapterkit.train.base import load_base
    from adapterkit.train.data import load_examples
    from adapterkit.train.evaluate import evaluate

    out = tmp_path / "ia3.safetensors"
    result = CliRunner().invoke(cli, [
        "train", str(example["llama"]), "--method", "ia3", "--task", "causal-lm", "--data",
        str(example["support_casual"]), "--eval-data", str(example["support_sample"]), "--steps", "12",
        "--batch-size", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    adapter = load(out)
    component = adapter.component("ia3")
    assert component.kind == "ia3" and adapter.manifest.training["lr"] == KINDS["ia3"].default_lr
    assert {t.rsplit(".", 1)[1] for t in component.targets} == {"k_proj", "v_proj", "down_proj"}
    assert all(component.param(t, "feedforward") == t.endswith("down_proj") for t in component.targets)
    base = load_base(example["llama"], "causal-lm")
    before = evaluate(base.model, base.tokenizer, load_examples(example["support_sample"]), "causal-lm")["loss"]
    assert adapter.manifest.training["eval"]["loss"] < before - 0.01
