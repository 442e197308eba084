"""Format detection names what it sees (adapterkit, PEFT, AdapterHub, kohya, diffusers in both layouts, GGUF by its
magic bytes, an ONNX Runtime adapter; else "unknown: ..." or a pickle, refused), and the commands that want an
adapterkit file say which conversion makes one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from adapterkit import save
from adapterkit.converters import peft as peft_format
from adapterkit.converters.registry import FORMATS, detect_format, foreign_hint
from adapterkit.errors import FormatError
from adapterkit.io import safetensors
from cli_runner import call_cli

ADAPTERHUB = Path(__file__).parent / "fixtures" / "adapterhub" / "bert_houlsby"
Q0 = "model.layers.0.self_attn.q_proj"


def factors(rank=2, size=8):
    return np.ones((rank, size), np.float32), np.ones((size, rank), np.float32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detect")
    llama = tiny_models.llama()
    lora = tiny_models.random_lora(llama, [Q0])
    save(lora, folder / "ours.safetensors")
    peft_format.write(lora, folder / "peft")
    a, b = factors()
    safetensors.write_file(folder / "kohya.safetensors", {
        "lora_unet_conv_in.lora_down.weight": a, "lora_unet_conv_in.lora_up.weight": b,
        "lora_unet_conv_in.alpha": np.asarray(2.0, np.float32)})
    safetensors.write_file(folder / "kohya_te.safetensors", {
        "lora_te1_encoder_layers_0_mlp_fc1.lora_down.weight": a,
        "lora_te1_encoder_layers_0_mlp_fc1.lora_up.weight": b})
    safetensors.write_file(folder / "diffusers.safetensors", {
        "unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b},
        metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2})})
    safetensors.write_file(folder / "diffusers_old.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": a,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": b})
    (folder / "diffusers_folder").mkdir()
    safetensors.write_file(folder / "diffusers_folder" / "pytorch_lora_weights.safetensors", {
        "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight": a,
        "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight": b})
    (folder / "adapter.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32))
    (folder / "named_wrong.bin").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32))
    (folder / "tensors.onnx_adapter").write_bytes(b"\x00" * 16)
    safetensors.write_file(folder / "other.safetensors", {"encoder.weight": a})
    (folder / "lora.ckpt").write_bytes(b"PK\x03\x04" + bytes(16))
    (folder / "lora.pt").write_bytes(b"\x80\x04" + bytes(16))
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder


@pytest.mark.parametrize("name, expected", [
    ("ours.safetensors", "adapterkit"),
    ("peft", "peft"),
    ("kohya.safetensors", "kohya"),
    ("kohya_te.safetensors", "kohya"),
    ("diffusers.safetensors", "diffusers"),
    ("diffusers_old.safetensors", "diffusers"),
    ("diffusers_folder", "diffusers"),
    ("adapter.gguf", "gguf"),
    ("named_wrong.bin", "gguf"),  # by its magic bytes, whatever its name
    ("tensors.onnx_adapter", "onnx-adapter"),
])
def test_detect_format_names_what_it_sees(inputs, name, expected):
    assert detect_format(inputs / name) == expected


def test_detect_format_names_adapterhub_folders():
    assert detect_format(ADAPTERHUB) == "adapterhub"


@pytest.mark.parametrize("name, message", [
    ("other.safetensors", "unknown: a safetensors file without an adapterkit manifest whose tensor names match no "
                          "adapter format adapterkit reads (first tensor 'encoder.weight'"),
    ("lora.ckpt", "a pickle (PyTorch .ckpt/.pt/.bin), which adapterkit never loads"),
    ("lora.pt", "a pickle"),
    ("empty", "unknown: a folder holding no adapter this adapterkit reads"),
    ("notes.txt", "unknown: neither a safetensors file nor a GGUF file"),
])
def test_what_no_format_claims_is_refused_saying_what_it_is(inputs, name, message):
    with pytest.raises(FormatError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        detect_format(inputs / name)


def test_convert_of_a_kohya_file_asks_for_the_base_not_for_to(inputs):
    """It used to say "the input is already an adapterkit file: say --to FORMAT"."""
    done = call_cli("convert", inputs / "kohya.safetensors", "-o", inputs / "out.safetensors")
    assert done.returncode == 1
    assert "already an adapterkit file" not in done.stderr
    assert "give --base" in done.stderr and done.stderr.count("\n") == 1


def test_convert_of_an_unknown_or_unreadable_input_says_what_it_is(inputs):
    done = call_cli("convert", inputs / "other.safetensors", "-o", inputs / "out.safetensors")
    assert done.returncode == 1 and "unknown: a safetensors file without an adapterkit manifest" in done.stderr
    if "gguf" not in FORMATS:  # until a GGUF converter is registered
        done = call_cli("convert", inputs / "adapter.gguf", "-o", inputs / "out.safetensors")
        assert done.returncode == 1
        assert "is a GGUF (llama.cpp) adapter file: this adapterkit has no converter that reads it" in done.stderr
    done = call_cli("convert", inputs / "tensors.onnx_adapter", "-o", inputs / "out.safetensors")
    assert done.returncode == 1 and "onnx-adapter files can be written, not read" in done.stderr


@pytest.mark.parametrize("command", [["inspect"], ["validate"], ["compose", "-o", "x.safetensors"]])
def test_commands_that_want_an_adapterkit_file_say_which_conversion_makes_one(inputs, command):
    done = call_cli(command[0], inputs / "kohya.safetensors", *command[1:])
    assert done.returncode == 1
    assert (f"it is a kohya adapter (kohya-ss / A1111 / ComfyUI LoRA file (lora_unet_…, lora_te_…; reading needs "
            f"--base)): convert it first, adapterkit convert {inputs / 'kohya.safetensors'} --base BASE -o "
            "adapter.safetensors") in done.stdout + done.stderr


def test_foreign_hint(inputs):
    assert foreign_hint(inputs / "ours.safetensors") is None
    assert foreign_hint(inputs / "other.safetensors") is None
    assert "adapterkit convert" in foreign_hint(inputs / "peft") and "--base" not in foreign_hint(inputs / "peft")
    assert "adapterkit convert" in foreign_hint(inputs / "diffusers_folder")
