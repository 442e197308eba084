"""DoRA against PEFT's own DoRA (``LoraConfig(use_dora=True)``) on tiny Llama, GPT-2 (Conv1D) and BERT.

Each PEFT model is built by PEFT with random factors and a randomised magnitude, saved by PEFT and read by our
converter (PEFT's layout is never rebuilt by hand here). Then: attach equals PEFT's forward; merge equals attach and
PEFT's own merge; unmerge restores the base, and is refused without the norms merge kept; what we write back loads in
PEFT with the same output and keys; one training step's gradients equal PEFT's (the norm gets none); ``train --method
dora`` works through the CLI. The rest of the contract (save/load, detach, ONNX, training) is
``tests/test_kind_contract.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

import adapterkit
import tiny_models
from adapterkit import Adapter, BaseModel, Component, Manifest, fingerprint
from adapterkit.adapter import tensor_name
from adapterkit.attach import attach
from adapterkit.cli import cli
from adapterkit.compose import compose
from adapterkit.converters import peft as peft_format
from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.lora import uniform_alpha
from adapterkit.merge import merge_into_model, unmerge_from_model
from adapterkit.onnx.slots import adapter_feeds

MODELS = tiny_models.MODELS
#: what PEFT adapts on each model: an embedding and rank/alpha patterns (Llama), Conv1D (GPT-2), rsLoRA (BERT)
PEFT_OPTIONS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                  alpha_pattern={"v_proj": 3.0}),
    "gpt2": dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "bert": dict(target_modules=["query", "value", "dense"], use_rslora=True),
}
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 8, 15, 16, 23, 42, 99, 127]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])


def output(model) -> torch.Tensor:
    result = model(input_ids=IDS, attention_mask=MASK)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def peft_dora(name: str) -> PeftModel:
    """PEFT's DoRA on a fresh tiny ``name``: random A and B (init_lora_weights=False), magnitudes randomised too (PEFT
    starts them at ‖W + s·B·A‖, which would make the magnitude a no-op)."""
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **PEFT_OPTIONS[name])
    model = get_peft_model(MODELS[name](), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in parameter_name:
                parameter.mul_(0.5 + torch.rand(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, tiny_dirs, tmp_path_factory):
    """(model name, PEFT's model, PEFT's folder, our adapter read from it)."""
    name = request.param
    return (name, *convert(name, tiny_dirs[name], tmp_path_factory.mktemp(f"peft_{name}")))


def convert(name: str, base_dir, folder) -> tuple[PeftModel, object, Adapter]:
    """PEFT's DoRA on ``name`` saved by PEFT into ``folder`` and read by our converter."""
    model = peft_dora(name)
    model.save_pretrained(folder, save_embedding_layers=False)
    return model, folder, peft_format.read(folder, base=base_dir)


def test_converted_adapter_is_one_dora_component(converted):
    name, _, _, adapter = converted
    [component] = adapter.components
    assert component.kind == "dora" and component.weight == 1
    assert component.params["rank"] == 4 and component.params["alpha"] == 8
    roles = adapter.component_tensors("dora")
    for target, held in roles.items():
        assert set(held) == {"lora_A", "lora_B", "magnitude"}
        assert held["magnitude"].shape == (held["lora_B"].shape[0],)
    if name == "llama":
        v_proj = component.target_params["model.layers.0.self_attn.v_proj"]
        assert v_proj == {"rank": 2, "alpha": 3.0}
        assert component.param("model.embed_tokens", "fan_in_fan_out") is True
        assert roles["model.embed_tokens"]["magnitude"].shape == (32,)  # one per embedding dimension
    if name == "gpt2":
        assert component.params["fan_in_fan_out"] is True
    if name == "bert":
        assert component.params["scaling"] == "rslora"


def test_attach_equals_peft(converted):
    name, peft_model, _, adapter = converted
    with torch.no_grad():
        expected = output(peft_model)
    model = MODELS[name]()
    with torch.no_grad():
        base = output(model)
        with attach(model, adapter):
            attached = output(model)
    assert not torch.allclose(attached, base, atol=1e-3)
    torch.testing.assert_close(attached, expected, atol=1e-5, rtol=0)


def test_merge_equals_attach_and_peft_merge_and_unmerge_restores(converted):
    name, peft_model, folder, adapter = converted
    model = MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), attach(model, adapter):
        attached = output(model)
    merge_into_model(model, [adapter])
    with torch.no_grad():
        torch.testing.assert_close(output(model), attached, atol=1e-5, rtol=0)
    # PEFT's own merge of the same adapter gives the same weights
    peft_merged = PeftModel.from_pretrained(MODELS[name](), folder).merge_and_unload().state_dict()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, peft_merged[key], atol=1e-5, rtol=0)
    assert all(set(kept) == {"norm"} for kept in model.adapterkit_kept.values())
    unmerge_from_model(model, [adapter])
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[key], atol=1e-5, rtol=0)


def test_unmerge_without_the_kept_norms_is_refused(converted):
    name, _, _, adapter = converted
    model = merge_into_model(MODELS[name](), [adapter])
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    del model.adapterkit_kept
    with pytest.raises(RequestError, match="cannot be unmerged without the row norms its merge kept") as caught:
        unmerge_from_model(model, [adapter])
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())  # refused before any change


def test_written_peft_folder_loads_in_peft_with_the_same_output(converted, tiny_dirs, tmp_path):
    name, peft_model, folder, adapter = converted
    peft_format.write(adapter, tmp_path / "out", base=tiny_dirs[name])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    # written portably (one alpha, no alpha_pattern or rsLoRA): the other targets' scales are folded into B
    [component] = adapter.components
    ranks = {t: roles["lora_A"].shape[0] for t, roles in adapter.component_tensors(component.name).items()}
    alpha, factors = uniform_alpha(component, ranks)
    assert config["lora_alpha"] == alpha and config["alpha_pattern"] == {} and config["use_rslora"] is False
    with safe_open(folder / "adapter_model.safetensors", "pt") as theirs, \
            safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as ours:
        assert set(ours.keys()) == set(theirs.keys())
        for key in theirs.keys():
            target = key.removeprefix(peft_format.KEY_PREFIX).rpartition(".lora_")[0]
            expected = theirs.get_tensor(key)
            if ".lora_B" in key or ".lora_embedding_B" in key:
                expected = (expected.double() * factors[target]).float()
            assert torch.equal(ours.get_tensor(key), expected), key
    if name == "llama":  # v_proj's 3/2 against the most common 8/4·4 = 8: B·3/8
        assert alpha == 8 and factors["model.layers.0.self_attn.v_proj"] == 3 / 8
    if name == "bert":  # rsLoRA 8/√4 as the standard 16/4
        assert alpha == 16 and set(factors.values()) == {1.0}
    loaded = PeftModel.from_pretrained(MODELS[name](), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(loaded), output(peft_model), atol=1e-5, rtol=0)
    back = peft_format.read(tmp_path / "out", base=tiny_dirs[name])
    model = MODELS[name]()
    with torch.no_grad(), attach(model, back):
        torch.testing.assert_close(output(model), output(peft_model), atol=1e-5, rtol=0)


def test_unmerged_onnx_graph_with_an_embedding_target_equals_attach(tiny_dirs, tmp_path):
    """The export traces DoRA's forward with a dynamic rank per module (Llama: rank 4, v_proj 2, the embedding 4);
    with no adapter fed (rank 0, m = ‖W‖) the graph is the base."""
    from adapterkit.onnx.export import export_onnx, load_base
    from adapterkit.onnx.runner import Runner

    name = "llama"
    _, _, adapter = convert(name, tiny_dirs[name], tmp_path / "peft")
    model = load_base(tiny_dirs[name])
    export_onnx(tiny_dirs[name], [adapter], tmp_path / "onnx", merged=False, names=["a"])
    runner = Runner(tmp_path / "onnx")
    inputs = {"input_ids": IDS.numpy(), "attention_mask": MASK.numpy()}
    rows = MASK.bool()
    with torch.no_grad():
        base = output(model)
        with attach(model, adapter):
            expected = output(model)
    torch.testing.assert_close(torch.from_numpy(runner.run(inputs, "a")["logits"])[rows], expected[rows], atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(torch.from_numpy(runner.run(inputs)["logits"])[rows], base[rows], atol=1e-4, rtol=0)


def _peft_parameter(peft_model: PeftModel, target: str, role: str) -> torch.nn.Parameter:
    module = peft_model.base_model.model.get_submodule(target)
    if role == "magnitude":
        return module.lora_magnitude_vector["default"].weight
    if isinstance(module.get_base_layer(), torch.nn.Embedding):
        return getattr(module, role.replace("lora_", "lora_embedding_"))["default"]
    return getattr(module, role)["default"].weight


def test_one_training_step_has_peft_gradients_and_none_through_the_norm(converted):
    name, _, folder, adapter = converted
    target = torch.randn(output(MODELS[name]()).shape, generator=torch.Generator().manual_seed(3))
    peft_model = PeftModel.from_pretrained(MODELS[name](), folder, is_trainable=True).eval()  # eval: no dropout
    (output(peft_model) - target).square().mean().backward()
    model = MODELS[name]().requires_grad_(False)
    with attach(model, adapter, trainable=True) as handle:
        (output(model) - target).square().mean().backward()
        for target_name in adapter.components[0].targets:
            for role in ("lora_A", "lora_B", "magnitude"):
                ours = handle.tensors[f"0/dora.{target_name}.{role}"].grad
                theirs = _peft_parameter(peft_model, target_name, role).grad
                torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-4, msg=f"{target_name} {role}")


def test_the_norm_takes_no_gradient():
    """d/dB of the output through g = m/‖W + s·B·A‖ is left out (Liu et al. §4.3): with x orthogonal to A's rows, the
    low-rank path gives B no gradient, so B's gradient must be exactly zero."""
    from adapterkit.kinds.dora.runtime import RUNTIME

    linear = torch.nn.Linear(4, 3).requires_grad_(False)
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.randn(3, 1).requires_grad_()
    magnitude = torch.rand(3) + 0.5
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # x Aᵀ = 0
    y = RUNTIME.after(linear, x, linear(x), {"lora_A": a, "lora_B": b, "magnitude": magnitude}, 1.0)
    y.sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_train_method_dora_through_the_cli(example, tmp_path):
    from adapterkit.train.base import load_base
    from adapterkit.train.data import load_examples
    from adapterkit.train.evaluate import evaluate

    out = tmp_path / "dora.safetensors"
    result = CliRunner().invoke(cli, [
        "train", str(example["llama"]), "--method", "dora", "--data", str(example["support_casual"]),
        "--eval-data", str(example["support_sample"]), "--steps", "12", "--batch-size", "8", "--lr", "1e-2",
        "--rank", "4", "--alpha", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    adapter = adapterkit.load(out)  # validates
    [component] = adapter.components
    assert component.kind == "dora" and component.params["rank"] == 4 and component.params["alpha"] == 8
    assert adapter.manifest.training["method"] == "dora" and adapter.manifest.training["steps"] == 12
    assert {name.rsplit(".", 1)[1] for name in adapter.tensors} == {"lora_A", "lora_B", "magnitude"}
    base = load_base(example["llama"], "causal-lm")
    examples = load_examples(example["support_sample"])
    before = evaluate(base.model, base.tokenizer, examples, "causal-lm")["loss"]
    with attach(base.model, adapter):
        after = evaluate(base.model, base.tokenizer, examples, "causal-lm")["loss"]
    assert after == pytest.approx(adapter.manifest.training["eval"]["loss"], rel=1e-5)
    assert after < before - 0.05, (before, after)


# -- refusals and rules ----------------------------------------------------------------------------------------------

def _dora(model, targets, seed=0, name="dora") -> Adapter:
    """A DoRA adapter on ``targets`` of ``model`` from the kind's own training start, randomised."""
    from adapterkit.kinds import get_kind

    generator = torch.Generator().manual_seed(seed)
    params, target_params, initial = get_kind("dora").runtime.initial(model, targets, {"rank": 2, "alpha": 4.0},
                                                                        generator)
    tensors = {tensor_name(name, t, role): value + 0.1 * torch.randn(value.shape, generator=generator)
               for t, roles in initial.items() for role, value in roles.items()}
    return Adapter(Manifest([Component(name, "dora", list(targets), params, target_params)],
                            BaseModel("tiny", None, fingerprint(model))), tensors)


def test_training_start_is_the_base():
    from adapterkit.kinds import get_kind

    model = tiny_models.gpt2()
    params, _, initial = get_kind("dora").runtime.initial(model, ["transformer.h.0.attn.c_attn"], {"rank": 2,
                                                          "alpha": 4.0}, torch.Generator().manual_seed(0))
    roles = initial["transformer.h.0.attn.c_attn"]
    assert params["fan_in_fan_out"] is True and not roles["lora_B"].any()
    weight = model.get_submodule("transformer.h.0.attn.c_attn").weight  # Conv1D: [in, out]
    torch.testing.assert_close(roles["magnitude"], weight.norm(dim=0))


def test_weight_compose_and_stacking_are_refused():
    model = tiny_models.bert()
    query = "encoder.layer.0.attention.self.query"
    adapter = _dora(model, [query])
    with pytest.raises(RequestError, match="cannot be weighted"):
        attach(model, adapter, weights=[0.5])
    with pytest.raises(RequestError, match="cannot be merged with a weight"):
        merge_into_model(model, [adapter], weights=[0.5])
    with pytest.raises(RequestError, match="cannot be composed"):
        compose([adapter])
    with pytest.raises(RequestError, match="already carries a DoRA component"):
        attach(model, [adapter, _dora(model, [query], seed=1)])
    with pytest.raises(RequestError, match="magnitudes cannot be combined"):
        from adapterkit.kinds import get_kind

        feeds = [adapter_feeds(a, model=model) for a in (adapter, _dora(model, [query], seed=1))]
        get_kind("dora").runtime.combine("magnitude", [f[f"{query}.dora.magnitude"] for f in feeds])
    assert type(model.get_submodule(query)) is torch.nn.Linear  # every refusal left the model as it was


def test_dora_acts_first_on_its_module_whatever_the_attach_order():
    """Kinds act on a module in the registry's order (DoRA first: its norm is of the weight it finds), so a LoRA
    attached before a DoRA on one module gives what merging them gives (DoRA, then LoRA)."""
    model = tiny_models.bert().double()
    query = "encoder.layer.0.attention.self.query"
    adapter, lora = _dora(model, [query]), tiny_models.random_lora(model, [query])
    ids = torch.tensor([[1, 5, 9, 33, 2, 77]])
    with torch.no_grad():
        with attach(model, [lora, adapter]):
            lora_first = model(input_ids=ids).last_hidden_state
        with attach(model, [adapter, lora]):
            dora_first = model(input_ids=ids).last_hidden_state
        merged = merge_into_model(model, [lora, adapter])(input_ids=ids).last_hidden_state
    torch.testing.assert_close(lora_first, dora_first, atol=1e-12, rtol=0)
    torch.testing.assert_close(lora_first, merged, atol=1e-10, rtol=0)


def test_a_bias_update_before_the_dora_on_one_module_is_not_rescaled():
    """BitFit, then DoRA on the same module: DoRA rescales W x only (not Δb), so attach equals merge."""
    model = tiny_models.bert().double()
    query = "encoder.layer.0.attention.self.query"
    bias = Adapter(Manifest([Component("bias", "bitfit", [query], {})], BaseModel("tiny", None, fingerprint(model))),
                   {tensor_name("bias", query, "bias"): np.full(32, 0.5, dtype=np.float32)})
    adapter = _dora(model, [query])
    with torch.no_grad(), attach(model, [bias, adapter]):
        attached = output(model)
    merge_into_model(model, [bias, adapter])
    with torch.no_grad():
        torch.testing.assert_close(output(model), attached, atol=1e-9, rtol=1e-9)


def test_a_magnitude_of_the_wrong_shape_is_a_format_error(tmp_path):
    model = tiny_models.bert()
    query = "encoder.layer.0.attention.self.query"
    adapter = _dora(model, [query])
    adapter.tensors[tensor_name("dora", query, "magnitude")] = np.ones(31, dtype=np.float32)
    with pytest.raises(FormatError, match="magnitude must be 1-D with one entry per output row"):
        adapter.validate()


def test_a_merged_checkpoint_keeps_the_norms_and_unmerges(tmp_path):
    """merge on disk keeps DoRA's row norms beside the record (adapterkit_merge.safetensors), under each merge's
    entry: a later merge and unmerge keep them apart, and unmerging everything restores the base."""
    import json

    from adapterkit import save
    from adapterkit.io.checkpoint import Checkpoint
    from adapterkit.merge_checkpoint import KEPT_FILE, RECORD_FILE, merge_checkpoint, unmerge_checkpoint

    model = tiny_models.llama()
    model.save_pretrained(tmp_path / "base")
    dora = _dora(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])
    lora = tiny_models.random_lora(model, ["model.layers.0.self_attn.q_proj"], seed=3)
    save(dora, tmp_path / "dora.safetensors")
    save(lora, tmp_path / "lora.safetensors")
    merge_checkpoint(tmp_path / "base", [tmp_path / "dora.safetensors", tmp_path / "lora.safetensors"],
                     tmp_path / "merged")
    assert [e["id"] for e in json.loads((tmp_path / "merged" / RECORD_FILE).read_text())["merged"]] == ["m1", "m2"]
    merge_checkpoint(tmp_path / "merged", [tmp_path / "lora.safetensors"], tmp_path / "twice", weights=[0.5])
    unmerge_checkpoint(tmp_path / "twice", [tmp_path / "lora.safetensors"], tmp_path / "once", weights=[0.5])
    assert (tmp_path / "once" / KEPT_FILE).is_file()  # the DoRA's norms are still there
    unmerge_checkpoint(tmp_path / "once", [tmp_path / "dora.safetensors", tmp_path / "lora.safetensors"],
                       tmp_path / "restored")
    assert not (tmp_path / "restored" / KEPT_FILE).exists()
    with Checkpoint(tmp_path / "base") as base, Checkpoint(tmp_path / "restored") as restored:
        for name in base.names():
            np.testing.assert_allclose(restored.get(name), base.get(name), atol=1e-4, rtol=0)
