"""kohya and diffusers LoRA files: read and written both ways, checked against diffusers' own loaders (which turn
them into PEFT layers) and writers, on a tiny pipeline folder (UNet2DConditionModel + CLIPTextModel built from
configs); merge into a diffusers pipeline folder and one of its model folders."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import tiny_diffusers  # noqa: E402
from adapterkit import AdapterError, load, save  # noqa: E402
from adapterkit.adapter import Adapter  # noqa: E402
from adapterkit.arrays import to_torch  # noqa: E402
from adapterkit.attach import attach  # noqa: E402
from adapterkit.converters import diffusers as diffusers_format  # noqa: E402
from adapterkit.converters import kohya  # noqa: E402
from adapterkit.io import safetensors  # noqa: E402
from adapterkit.merge import merge_into_model  # noqa: E402
from adapterkit.merge_checkpoint import merge_checkpoint, unmerge_checkpoint  # noqa: E402

CONV3 = "unet.down_blocks.0.resnets.0.conv1"
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
TE_Q = "text_encoder.encoder.layers.0.self_attn.q_proj"
TE_FC1 = "text_encoder.encoder.layers.1.mlp.fc1"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_diffusers.save_pipeline(tmp_path_factory.mktemp("pipe") / "sd")


@pytest.fixture(scope="module")
def models(pipe):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(pipe / "unet").eval(),
            "text_encoder": CLIPTextModel.from_pretrained(pipe / "text_encoder").eval()}


@pytest.fixture(scope="module")
def lora(models):
    """rank 3, α 5 on UNet Linear and Conv2d modules and text encoder projections; one target with its own rank and
    α, one with its own α, a component weight to fold. (diffusers' loader of kohya files drops the α of attention
    projections — its network-alpha names for ``to_q_lora`` match no module — so the overrides are elsewhere.)"""
    unet = tiny_diffusers.random_lora(dict(models["unet"].named_modules()), tiny_diffusers.UNET_TARGETS, prefix="unet.")
    text = tiny_diffusers.random_lora(dict(models["text_encoder"].named_modules()), tiny_diffusers.TEXT_TARGETS,
                                      prefix="text_encoder.", seed=2)
    component = unet.components[0]
    component.targets += text.components[0].targets
    component.target_params[TE_FC1] = {"alpha": 2.5}
    tensors = {**unet.tensors, **text.tensors}
    tensors[f"default.{FF}.lora_A"] = torch.randn(2, 16, generator=torch.Generator().manual_seed(3)) * 0.3
    tensors[f"default.{FF}.lora_B"] = torch.randn(128, 2, generator=torch.Generator().manual_seed(4)) * 0.3
    component.target_params[FF] = {"rank": 2, "alpha": 7.0}
    component.weight = 0.8
    adapter = Adapter(unet.manifest, tensors)
    adapter.validate()
    return adapter


def outputs(models, adapters=(), weights=None) -> dict[str, torch.Tensor]:
    """The UNet's and the text encoder's outputs, with ``adapters`` attached (on both, through their prefixes)."""
    inputs, ids = tiny_diffusers.unet_inputs(), tiny_diffusers.text_inputs()
    with torch.no_grad():
        if not adapters:
            return {"unet": models["unet"](**inputs).sample, "text_encoder": models["text_encoder"](ids)[0]}
        out = {}
        for name, model in models.items():
            mine = [_only(a, name) for a in adapters]
            with attach(model, mine, weights, force=True):
                out[name] = model(**inputs).sample if name == "unet" else model(ids)[0]
        return out


def _only(adapter: Adapter, component_name: str) -> Adapter:
    """The part of an adapter whose targets are one pipeline component's."""
    out = copy.deepcopy(adapter)
    for component in out.manifest.components:
        component.targets = [t for t in component.targets if t.startswith(component_name + ".")]
        component.target_params = {t: p for t, p in component.target_params.items() if t in component.targets}
    kept = {f"{c.name}.{t}." for c in out.components for t in c.targets}
    out.manifest.components = [c for c in out.manifest.components if c.targets]
    return Adapter(out.manifest, {n: t for n, t in adapter.tensors.items() if any(n.startswith(k) for k in kept)})


def diffusers_outputs(models, state_dict, network_alphas=None, metadata=None) -> dict[str, torch.Tensor]:
    """The outputs of copies of the models with the LoRA loaded by diffusers (PEFT layers)."""
    from diffusers import StableDiffusionPipeline

    unet, text_encoder = copy.deepcopy(models["unet"]), copy.deepcopy(models["text_encoder"])
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet=unet, adapter_name="x",
                                                metadata=metadata)
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, network_alphas, text_encoder=text_encoder,
                                                        adapter_name="x", metadata=metadata)
    with torch.no_grad():
        return {"unet": unet(**tiny_diffusers.unet_inputs()).sample,
                "text_encoder": text_encoder(tiny_diffusers.text_inputs())[0]}


def assert_outputs_close(got, expected, atol=1e-5):
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=1e-5, msg=name)


def same_effect(first: Adapter, second: Adapter, models) -> None:
    assert_outputs_close(outputs(models, [second]), outputs(models, [first]))


# --- kohya ----------------------------------------------------------------------------------------------------------


def test_kohya_written_with_the_true_alpha_and_read_back(tmp_path, pipe, lora, models):
    path = tmp_path / "kohya.safetensors"
    kohya.write(lora, path, base=pipe)
    buffer = safetensors.map_file(path)
    header = safetensors.read_header(buffer)
    tensors = {n: safetensors.tensor(buffer, header, n) for n in header.entries}
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert down.shape == (3, 8, 3, 3) and tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (
        8, 3, 1, 1)
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 5.0  # the true α, not the rank
    assert float(tensors["lora_te_encoder_layers_1_mlp_fc1.alpha"]) == 2.5
    assert float(tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha"]) == 7.0
    back = kohya.read(path, base=pipe)
    component = back.components[0]
    assert component.kind == "lora" and sorted(component.targets) == sorted(lora.components[0].targets)
    assert (component.params["rank"], component.params["alpha"]) == (3, 5)
    assert component.target_params[FF] == {"rank": 2, "alpha": 7}
    assert back.manifest.base_model.fingerprints  # recorded from the pipeline
    same_effect(lora, back, models)


def test_diffusers_loads_our_kohya_file_as_we_attach_it(tmp_path, pipe, lora, models):
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "kohya.safetensors"
    kohya.write(lora, path, base=pipe)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    theirs = diffusers_outputs(models, state_dict, alphas)
    ours = outputs(models, [lora])
    assert not torch.allclose(ours["unet"], outputs(models)["unet"], atol=1e-3)
    assert_outputs_close(theirs, ours)


def test_kohya_from_diffusers_writer_reads_with_the_rank_as_alpha(tmp_path, pipe, models):
    """diffusers' convert_state_dict_to_kohya writes .alpha = rank: the file says scale 1 whatever α was."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "conv1", "proj_in"]),
                                   copy.deepcopy(models["unet"]))
    generator = torch.Generator().manual_seed(5)
    for module in unet.modules():
        if hasattr(module, "lora_B"):
            module.lora_B["default"].weight.data.normal_(generator=generator)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    path = tmp_path / "from_diffusers.safetensors"
    safetensors.write_file(path, convert_state_dict_to_kohya(state))
    adapter = kohya.read(path, base=pipe)
    assert adapter.components[0].params["alpha"] == 4 == adapter.components[0].params["rank"]
    with torch.no_grad():
        expected = unet(**tiny_diffusers.unet_inputs()).sample
        with attach(models["unet"], _only(adapter, "unet")):
            got = models["unet"](**tiny_diffusers.unet_inputs()).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kohya_alpha_absent_or_zero_means_the_rank_and_dora_scale_maps_to_dora(tmp_path, pipe, models):
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    generator = torch.Generator().manual_seed(6)
    tensors = {f"{linear}.lora_down.weight": torch.randn(2, 8, generator=generator),
               f"{linear}.lora_up.weight": torch.randn(8, 2, generator=generator),
               f"{linear}.dora_scale": torch.rand(8, 1, generator=generator) + 0.5,
               "lora_te_encoder_layers_1_mlp_fc1.lora_down.weight": torch.randn(2, 16, generator=generator),
               "lora_te_encoder_layers_1_mlp_fc1.lora_up.weight": torch.randn(32, 2, generator=generator),
               "lora_te_encoder_layers_1_mlp_fc1.alpha": torch.tensor(0.0)}  # 0 is the rank, as in sd-scripts
    safetensors.write_file(tmp_path / "dora.safetensors", tensors)
    adapter = kohya.read(tmp_path / "dora.safetensors", base=pipe)
    kinds = {c.kind: c for c in adapter.components}
    assert kinds["dora"].targets == [TO_Q] and kinds["lora"].params["alpha"] == 2
    magnitude = adapter.component_tensors("dora")[TO_Q]["magnitude"]
    np.testing.assert_array_equal(magnitude, tensors[f"{linear}.dora_scale"].numpy().reshape(8))
    kohya.write(adapter, tmp_path / "back.safetensors", base=pipe)
    again = kohya.read(tmp_path / "back.safetensors", base=pipe)
    np.testing.assert_array_equal(again.component_tensors("dora")[TO_Q]["magnitude"], magnitude)
    tensors[f"{linear}.dora_scale"] = torch.ones(1, 8)
    safetensors.write_file(tmp_path / "column.safetensors", tensors)
    with pytest.raises(AdapterError, match=r"dora_scale has shape \[1, 8\].*norm per input column"):
        kohya.read(tmp_path / "column.safetensors", base=pipe)


@pytest.fixture(scope="module")
def ambiguous_base(tmp_path_factory):
    """A model folder whose modules a.b_c and a_b.c have the same kohya name."""
    folder = tmp_path_factory.mktemp("ambiguous") / "text_encoder"
    folder.mkdir()
    safetensors.write_file(folder / "model.safetensors", {"a.b_c.weight": np.zeros((4, 4), np.float32),
                                                          "a_b.c.weight": np.zeros((4, 4), np.float32),
                                                          "d.e.weight": np.zeros((4, 4), np.float32)})
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    return folder


@pytest.mark.parametrize("keys, message", [
    (["lora_te_a_b_c"], r"lora_te_a_b_c is ambiguous: it could be text_encoder\.a\.b_c or text_encoder\.a_b\.c"),
    (["lora_te_x_y"], "lora_te_x_y matches no module of the base"),
    (["lora_unet_input_blocks_4_1_proj_in"], "lora_unet_ tensors are for the unet or transformer component"),
    (["lora_te2_d_e"], "lora_te2_ tensors are for the text_encoder_2 component"),
])
def test_kohya_names_resolve_to_exactly_one_module(tmp_path, ambiguous_base, keys, message):
    tensors = {}
    for key in keys:
        tensors[f"{key}.lora_down.weight"] = np.zeros((2, 4), np.float32)
        tensors[f"{key}.lora_up.weight"] = np.zeros((4, 2), np.float32)
    safetensors.write_file(tmp_path / "k.safetensors", tensors)
    with pytest.raises(AdapterError, match=message) as info:
        kohya.read(tmp_path / "k.safetensors", base=ambiguous_base)
    assert "\n" not in str(info.value)
    tensors = {"lora_te_d_e.lora_down.weight": np.ones((2, 4), np.float32),
               "lora_te_d_e.lora_up.weight": np.ones((4, 2), np.float32)}
    safetensors.write_file(tmp_path / "ok.safetensors", tensors)
    assert kohya.read(tmp_path / "ok.safetensors", base=ambiguous_base).components[0].targets == ["text_encoder.d.e"]


def test_kohya_refusals(tmp_path, pipe):
    tensors = {"lora_unet_conv_in.lora_down.weight": np.zeros((2, 4, 3, 3), np.float32),
               "lora_unet_conv_in.lora_up.weight": np.zeros((8, 2, 1, 1), np.float32)}
    safetensors.write_file(tmp_path / "k.safetensors", tensors)
    with pytest.raises(AdapterError, match="only the base's module list resolves: give --base"):
        kohya.read(tmp_path / "k.safetensors")
    (tmp_path / "k.ckpt").write_bytes(b"\x80\x04junk")
    with pytest.raises(AdapterError, match="is a pickle, which adapterkit never loads"):
        kohya.read(tmp_path / "k.ckpt", base=pipe)
    safetensors.write_file(tmp_path / "sgm.safetensors", {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": np.zeros((2, 8, 1, 1), np.float32),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": np.zeros((8, 2, 1, 1), np.float32)})
    with pytest.raises(AdapterError, match="original SGM/LDM UNet"):
        kohya.read(tmp_path / "sgm.safetensors", base=pipe)
    safetensors.write_file(tmp_path / "loha.safetensors", {
        "lora_unet_conv_in.hada_w1_a": np.zeros((8, 2), np.float32)})
    with pytest.raises(AdapterError, match=r"LoHa \(LyCORIS\), not LoRA"):
        kohya.read(tmp_path / "loha.safetensors", base=pipe)
    safetensors.write_file(tmp_path / "wrong.safetensors", {
        "lora_unet_conv_in.lora_down.weight": np.zeros((2, 4, 1, 1), np.float32),
        "lora_unet_conv_in.lora_up.weight": np.zeros((8, 2, 1, 1), np.float32)})
    with pytest.raises(AdapterError, match=r"do not fit the module's weight \[8, 4, 3, 3\]"):
        kohya.read(tmp_path / "wrong.safetensors", base=pipe)


# --- diffusers ------------------------------------------------------------------------------------------------------


def test_diffusers_written_peft_style_loads_in_diffusers_as_we_attach_it(tmp_path, pipe, lora, models):
    from diffusers import StableDiffusionPipeline

    diffusers_format.write(lora, tmp_path / "lora")
    assert (tmp_path / "lora" / diffusers_format.WEIGHTS_FILE).is_file()
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "lora"),
                                                                           return_lora_metadata=True)
    assert alphas is None and metadata["unet.lora_alpha"] == 5.0 and metadata["unet.alpha_pattern"] == {
        FF.removeprefix("unet."): 7.0}
    assert state_dict[f"{CONV3}.lora_A.weight"].shape == (3, 8, 3, 3)
    assert_outputs_close(diffusers_outputs(models, state_dict, metadata=metadata), outputs(models, [lora]))
    back = diffusers_format.read(tmp_path / "lora", base=pipe)
    same_effect(lora, back, models)


def test_diffusers_reads_what_diffusers_save_lora_weights_writes(tmp_path, pipe, models):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "conv1", "proj_in", "ff.net.0.proj"],
                                  rank_pattern={"conv1": 2}, alpha_pattern={"proj_in": 3}),
               "text_encoder": LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "fc1"])}
    peft_models = {name: inject_adapter_in_model(configs[name], copy.deepcopy(models[name])) for name in models}
    generator = torch.Generator().manual_seed(8)
    for model in peft_models.values():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.data.normal_(generator=generator)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "saved", unet_lora_layers=get_peft_model_state_dict(peft_models["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(peft_models["text_encoder"]),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    adapter = diffusers_format.read(tmp_path / "saved", base=pipe)
    component = adapter.components[0]
    assert component.target_params[CONV3]["rank"] == 2
    assert component.target_params["unet.down_blocks.0.attentions.0.proj_in"]["alpha"] == 3
    assert component.target_params[TE_Q]["scaling"] == "rslora"
    with torch.no_grad():
        expected = {"unet": peft_models["unet"](**tiny_diffusers.unet_inputs()).sample,
                    "text_encoder": peft_models["text_encoder"](tiny_diffusers.text_inputs())[0]}
    assert_outputs_close(outputs(models, [adapter]), expected)


def test_diffusers_old_layout_with_network_alphas_reads_as_the_kohya_file(tmp_path, pipe, lora, models):
    """diffusers' own conversion of a kohya file gives the older layout (…to_q_lora.down.weight, ….lora.down.weight,
    …lora_linear_layer…) and network alphas: read, it is the same adapter."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    kohya.write(lora, tmp_path / "kohya.safetensors", base=pipe)
    buffer = safetensors.map_file(tmp_path / "kohya.safetensors")
    header = safetensors.read_header(buffer)
    state = {n: torch.from_numpy(np.array(safetensors.tensor(buffer, header, n))) for n in header.entries}
    old, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    assert any("to_q_lora.down.weight" in k for k in old) and any(".lora.down.weight" in k for k in old)
    old.update({k: torch.tensor(v) for k, v in alphas.items()})
    safetensors.write_file(tmp_path / "old.safetensors", old)
    for base in (pipe, None):
        adapter = diffusers_format.read(tmp_path / "old.safetensors", base=base)
        assert sorted(adapter.components[0].targets) == sorted(lora.components[0].targets)
        same_effect(lora, adapter, models)


def test_diffusers_without_metadata_reads_alpha_as_the_rank(tmp_path, pipe, lora):
    diffusers_format.write(lora, tmp_path / "plain.safetensors")
    buffer = safetensors.map_file(tmp_path / "plain.safetensors")
    header = safetensors.read_header(buffer)
    safetensors.write_file(tmp_path / "bare.safetensors",
                           {n: safetensors.tensor(buffer, header, n) for n in header.entries})
    adapter = diffusers_format.read(tmp_path / "bare.safetensors")
    assert adapter.components[0].params["alpha"] == adapter.components[0].params["rank"] == 3


# --- the command line -----------------------------------------------------------------------------------------------


def test_cli_converts_both_ways_and_names_the_format(tmp_path, pipe, lora, models):
    from adapterkit.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
            raise SystemExit(0)
        return info.value.code

    save(lora, tmp_path / "a.safetensors")
    assert run("convert", tmp_path / "a.safetensors", "--to", "kohya", "-o", tmp_path / "k.safetensors") == 0
    assert run("convert", tmp_path / "a.safetensors", "--to", "diffusers", "-o", tmp_path / "d") == 0
    assert run("convert", tmp_path / "k.safetensors", "--base", pipe, "-o", tmp_path / "from_k.safetensors") == 0
    assert run("convert", tmp_path / "d", "-o", tmp_path / "from_d.safetensors") == 0
    same_effect(lora, load(tmp_path / "from_k.safetensors"), models)
    same_effect(lora, load(tmp_path / "from_d.safetensors"), models)


# --- merge into a diffusers pipeline folder -------------------------------------------------------------------------


def test_merge_into_a_pipeline_folder_lands_each_target_in_its_component(tmp_path, pipe, lora, models):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    adapter = kohya.read(_kohya_file(tmp_path, lora, pipe), base=pipe)
    merge_checkpoint(pipe, [adapter], tmp_path / "merged", weights=[0.5])
    merged = {"unet": UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").eval(),
              "text_encoder": CLIPTextModel.from_pretrained(tmp_path / "merged" / "text_encoder").eval()}
    assert (tmp_path / "merged" / "model_index.json").read_bytes() == (pipe / "model_index.json").read_bytes()
    assert_outputs_close(outputs(merged), outputs(models, [adapter], [0.5]))
    unmerge_checkpoint(tmp_path / "merged", [adapter], tmp_path / "unmerged", weights=[0.5])
    restored = UNet2DConditionModel.from_pretrained(tmp_path / "unmerged" / "unet").eval()
    torch.testing.assert_close(restored.conv_in.weight, models["unet"].conv_in.weight, atol=1e-6, rtol=0)


def test_merge_into_one_component_folder_takes_its_targets(tmp_path, pipe, lora, models, caplog):
    from diffusers import UNet2DConditionModel

    adapter = kohya.read(_kohya_file(tmp_path, lora, pipe), base=pipe)
    with caplog.at_level(logging.WARNING):
        merge_checkpoint(pipe / "unet", [adapter], tmp_path / "unet_merged")  # the pipeline's fingerprint is accepted
    assert "targets of other components are not merged here (3 of text_encoder)" in caplog.text
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "unet_merged").eval()
    expected = merge_into_model(copy.deepcopy(models["unet"]), [_only(adapter, "unet")], force=True)
    for name, parameter in expected.named_parameters():
        torch.testing.assert_close(merged.get_parameter(name), parameter, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(AdapterError, match="no target of the adapters is in unet"):
        merge_checkpoint(pipe / "unet", [_only(adapter, "text_encoder")], tmp_path / "nothing")


def _kohya_file(tmp_path, lora, pipe):
    path = tmp_path / "k.safetensors"
    if not path.exists():
        kohya.write(lora, path, base=pipe)
    return path
