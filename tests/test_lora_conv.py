"""LoRA on Conv2d (kohya's and PEFT's layout: A [r, in, kh, kw], B [out, r, 1, 1]) on a tiny diffusers UNet: attach
and merge against PEFT's own LoRA Conv2d/Linear layers holding the same tensors, compose, the format rules, ONNX."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import tiny_diffusers  # noqa: E402
from adapterkit import AdapterError, load, save  # noqa: E402
from adapterkit.adapter import Adapter  # noqa: E402
from adapterkit.arrays import to_torch  # noqa: E402
from adapterkit.attach import attach  # noqa: E402
from adapterkit.compose import compose  # noqa: E402
from adapterkit.merge import merge_into_model, unmerge_from_model  # noqa: E402

CONV3 = "down_blocks.0.resnets.0.conv1"
CONV1 = "down_blocks.0.attentions.0.proj_in"


@pytest.fixture(scope="module")
def unet():
    return tiny_diffusers.unet()


@pytest.fixture(scope="module")
def lora(unet):
    return tiny_diffusers.random_lora(dict(unet.named_modules()), tiny_diffusers.UNET_TARGETS, rank=3, alpha=5.0)


def peft_unet(unet, adapter: Adapter):
    """A copy of ``unet`` with PEFT's LoRA layers on the adapter's targets, holding its tensors."""
    from peft import LoraConfig, inject_adapter_in_model

    component = adapter.components[0]
    model = copy.deepcopy(unet)
    config = LoraConfig(r=component.params["rank"], lora_alpha=component.params["alpha"],
                        target_modules=list(component.targets), lora_dropout=0.0)
    model = inject_adapter_in_model(config, model)
    for target, roles in adapter.component_tensors(component.name).items():
        layer = model.get_submodule(target)
        layer.lora_A["default"].weight.data.copy_(to_torch(roles["lora_A"]))
        layer.lora_B["default"].weight.data.copy_(to_torch(roles["lora_B"]))
    return model


def test_conv_factors_are_stored_as_kohya_and_peft_store_them(tmp_path, unet, lora):
    roles = lora.component_tensors("default")
    assert list(roles[CONV3]["lora_A"].shape) == [3, 8, 3, 3] and list(roles[CONV3]["lora_B"].shape) == [8, 3, 1, 1]
    assert list(roles[CONV1]["lora_A"].shape) == [3, 8, 1, 1]
    save(lora, tmp_path / "conv.safetensors")
    loaded = load(tmp_path / "conv.safetensors")
    assert np.array_equal(loaded.component_tensors("default")[CONV3]["lora_A"], roles[CONV3]["lora_A"])


def test_attached_unet_equals_peft_lora_conv2d_and_linear(unet, lora):
    inputs = tiny_diffusers.unet_inputs()
    reference = peft_unet(unet, lora)
    with torch.no_grad():
        plain = unet(**inputs).sample
        expected = reference(**inputs).sample
        with attach(unet, lora, [0.7]):
            got_weighted = unet(**inputs).sample
        with attach(unet, lora):
            got = unet(**inputs).sample
        torch.testing.assert_close(unet(**inputs).sample, plain, atol=0, rtol=0)  # detached: the base again
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_weighted, got, atol=1e-4)


def test_merged_weights_equal_peft_delta_weights_and_unmerge_restores(unet, lora):
    reference = peft_unet(unet, lora)
    merged = merge_into_model(copy.deepcopy(unet), [lora], [1.0])
    for target in lora.components[0].targets:
        base = unet.get_submodule(target).weight
        delta = merged.get_submodule(target).weight - base
        expected = reference.get_submodule(target).get_delta_weight("default")
        assert delta.shape == base.shape
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    inputs = tiny_diffusers.unet_inputs(1)
    with torch.no_grad():
        with attach(unet, lora):
            attached = unet(**inputs).sample
        torch.testing.assert_close(merged(**inputs).sample, attached, atol=1e-5, rtol=1e-5)
    restored = unmerge_from_model(merged, [lora], [1.0])
    torch.testing.assert_close(restored.get_submodule(CONV3).weight, unet.get_submodule(CONV3).weight, atol=1e-6,
                               rtol=0)


def test_compose_keeps_conv_factors_and_is_exact_or_compressed(unet, lora):
    other = tiny_diffusers.random_lora(dict(unet.named_modules()), [CONV3, CONV1], rank=2, alpha=2.0, seed=9)
    weights = [0.5, -1.5]

    def deltas(adapter):
        model = merge_into_model(copy.deepcopy(unet), [adapter])
        return {t: model.get_submodule(t).weight - unet.get_submodule(t).weight for t in (CONV3, CONV1)}

    exact = {t: weights[0] * d + weights[1] * deltas(other)[t] for t, d in deltas(lora).items()}
    for method, options in (("concat", {}), ("svd", {"rank": 72}), ("dare", {"density": 1.0, "rank": 72})):
        composite = compose([lora, other], weights, method=method, **options)
        roles = composite.component_tensors("composed")
        assert roles[CONV3]["lora_A"].ndim == 4 and roles[CONV3]["lora_B"].shape[2:] == (1, 1)
        for target, delta in deltas(composite).items():
            torch.testing.assert_close(delta, exact[target], atol=1e-5, rtol=1e-5, msg=f"{method} {target}")
    truncated = compose([lora, other], weights, method="svd", rank=2)
    assert truncated.component_tensors("composed")[CONV3]["lora_A"].shape == (2, 8, 3, 3)
    assert truncated.manifest.composition["error"]["relative"] > 0


def test_format_rules_for_conv_factors(unet, lora):
    def with_roles(**changed):
        tensors = dict(lora.tensors)
        for role, value in changed.items():
            tensors[f"default.{CONV3}.{role}"] = value
        return Adapter(copy.deepcopy(lora.manifest), tensors)

    with pytest.raises(AdapterError, match=r"needs lora_B of shape \[out, r, 1, 1\]"):
        with_roles(lora_B=np.zeros((8, 3), np.float32)).validate()
    with pytest.raises(AdapterError, match="needs lora_B"):
        with_roles(lora_B=np.zeros((8, 3, 3, 3), np.float32)).validate()
    with pytest.raises(AdapterError, match="rank mismatch"):
        with_roles(lora_B=np.zeros((8, 2, 1, 1), np.float32)).validate()
    with pytest.raises(AdapterError, match="must be 2-D"):
        with_roles(lora_A=np.zeros((3, 8, 3), np.float32)).validate()
    flipped = copy.deepcopy(lora)
    flipped.manifest.components[0].target_params[CONV3] = {"fan_in_fan_out": True}
    with pytest.raises(AdapterError, match="cannot have fan_in_fan_out true"):
        flipped.validate()
    dora = copy.deepcopy(lora)  # DoRA adapts Linear modules only: its factors stay 2-D
    dora.manifest.components[0].kind = "dora"
    magnitudes = {f"default.{t}.magnitude": np.ones(lora.component_tensors("default")[t]["lora_B"].shape[0], np.float32)
                  for t in lora.components[0].targets}
    with pytest.raises(AdapterError, match="lora_A and lora_B must be 2-D, got"):
        Adapter(dora.manifest, {**lora.tensors, **magnitudes}).validate()


def test_conv_factors_that_do_not_fit_the_module_are_refused(unet, lora):
    wrong = Adapter(copy.deepcopy(lora.manifest), {
        name: (np.zeros((3, 8, 1, 1), np.float32) if name == f"default.{CONV3}.lora_A" else t)
        for name, t in lora.tensors.items()})
    with pytest.raises(AdapterError, match=r"kernel \[3, 3\]"):
        attach(copy.deepcopy(unet), wrong)
    with pytest.raises(AdapterError, match=r"the update is \[8, 8, 1, 1\], the base weight \[8, 8, 3, 3\]"):
        merge_into_model(copy.deepcopy(unet), [wrong])


def test_training_start_on_conv2d_is_the_base(unet):
    from adapterkit.kinds import get_kind

    runtime = get_kind("lora").runtime
    params, _, tensors = runtime.initial(unet, [CONV3, "conv_in"], {"rank": 2, "alpha": 4.0},
                                         torch.Generator().manual_seed(0))
    assert list(tensors[CONV3]["lora_A"].shape) == [2, 8, 3, 3] and not tensors[CONV3]["lora_B"].any()
    assert params["fan_in_fan_out"] is False
    assert CONV3 in runtime.candidates(unet, [])


def test_attached_conv_lora_exports_to_onnx_and_runs_in_onnxruntime(tmp_path, unet, lora):
    """The Conv2d forward is plain conv ops: the attached module exports and ONNX Runtime agrees with torch."""
    ort = pytest.importorskip("onnxruntime")
    block = copy.deepcopy(unet.get_submodule("down_blocks.0.resnets.0"))
    prefixed = tiny_diffusers.random_lora({"conv1": block.conv1, "conv2": block.conv2}, ["conv1", "conv2"], seed=4)
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 32)
    with torch.no_grad(), attach(block, prefixed):
        expected = block(x, temb)
        torch.onnx.export(block, (x, temb), tmp_path / "block.onnx", input_names=["x", "temb"], dynamo=True,
                          verbose=False)
    session = ort.InferenceSession(tmp_path / "block.onnx", providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "temb": temb.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-5)


def test_peft_folder_with_conv2d_targets_round_trips_and_loads_in_peft(tmp_path, unet, lora):
    from peft import PeftModel

    from adapterkit.converters import peft as peft_format

    peft_format.write(lora, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft").eval()
    inputs = tiny_diffusers.unet_inputs(2)
    with torch.no_grad():
        expected = loaded(**inputs).sample
        with attach(unet, lora):
            torch.testing.assert_close(unet(**inputs).sample, expected, atol=1e-5, rtol=1e-5)
    back = peft_format.read(tmp_path / "peft")
    assert back.component_tensors("lora")[CONV3]["lora_A"].shape == (3, 8, 3, 3)
    np.testing.assert_array_equal(back.component_tensors("lora")[CONV3]["lora_B"],
                                  lora.component_tensors("default")[CONV3]["lora_B"])
