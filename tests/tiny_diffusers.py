"""Tiny diffusers models built from configs (nothing is downloaded): a UNet2DConditionModel, CLIP text encoders, and
a pipeline folder holding them (``model_index.json``, ``unet/``, ``text_encoder/``, optionally ``text_encoder_2/``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adapterkit import Adapter, BaseModel, Component, Manifest
from adapterkit.adapter import tensor_name

UNET_TARGETS = [  # Linear and Conv2d (3×3 and 1×1) modules of the tiny UNet
    "conv_in",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.resnets.0.time_emb_proj",
    "up_blocks.0.resnets.0.conv_shortcut",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
]
# transformers 5 names CLIPTextModel's modules without text_model. (checkpoints saved by 4.x have it)
TEXT_TARGETS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.1.mlp.fc1"]


def unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()


def text_encoder(seed: int = 0, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=16)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def unet_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 8, 8, generator=generator), "timestep": torch.tensor([3, 7]),
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator)}


def text_inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def save_pipeline(folder: Path, seed: int = 0, second_encoder: bool = False) -> Path:
    """A diffusers pipeline folder with a tiny UNet and text encoder(s) (no VAE, tokenizer or scheduler: adapters
    touch only these)."""
    folder = Path(folder)
    unet(seed).save_pretrained(folder / "unet")
    text_encoder(seed + 1).save_pretrained(folder / "text_encoder")
    index = {"_class_name": "StableDiffusionXLPipeline" if second_encoder else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"]}
    if second_encoder:
        text_encoder(seed + 2, projection=True).save_pretrained(folder / "text_encoder_2")
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def random_lora(modules: dict[str, torch.nn.Module], targets: list[str], rank: int = 3, alpha: float = 5.0,
                seed: int = 1, prefix: str = "", name: str = "default", scaling: str = "standard") -> Adapter:
    """A LoRA with random factors on ``targets`` (Linear: A [r, in], B [out, r]; Conv2d: A [r, in, kh, kw], B
    [out, r, 1, 1]); targets are written with ``prefix`` (``unet.``) in front."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in targets:
        module = modules[target]
        if isinstance(module, torch.nn.Conv2d):
            a = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator) * 0.3
            b = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.3
        else:
            a = torch.randn(rank, module.in_features, generator=generator) * 0.3
            b = torch.randn(module.out_features, rank, generator=generator) * 0.3
        tensors[tensor_name(name, prefix + target, "lora_A")] = a
        tensors[tensor_name(name, prefix + target, "lora_B")] = b
    params = {"rank": rank, "alpha": alpha, "scaling": scaling, "fan_in_fan_out": False}
    return Adapter(Manifest([Component(name, "lora", [prefix + t for t in targets], params)], BaseModel("tiny")),
                   tensors)
