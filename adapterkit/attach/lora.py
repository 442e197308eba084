"""LoRA, unmerged: the wrapped module computes base(x) + Σᵢ sᵢ·wᵢ·(x Aᵢᵀ) Bᵢᵀ (Hu et al. 2021, eq. 3), never
forming ΔW = B·A. Works on ``nn.Linear``, transformers' ``Conv1D`` (GPT-2, which stores its weight as [in, out]:
the low-rank path is the same, only the base layout differs) and ``nn.Embedding`` (the token ids pick columns of A:
F.embedding(x, Aᵀ)·Bᵀ, as PEFT does).

Each adapter's A and B are parameters of the wrapper, in ``lora_A[<key>]`` and ``lora_B[<key>]`` with
``<key> = <adapter index>_<component name>`` (state-dict names ``<module>.lora_A.0_default``), so an exporter can
turn them into graph inputs; the scale s·w is a constant of the graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from adapterkit.attach.wrapper import AdapterWrapper, innermost
from adapterkit.errors import AdapterError
from adapterkit.kinds.lora import scale


class LoRAWrapper(AdapterWrapper):
    def __init__(self, base: torch.nn.Module):
        super().__init__(base)
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        self.scales: dict[str, float] = {}

    def add(self, key: str, a: torch.nn.Parameter, b: torch.nn.Parameter, scaling: float) -> None:
        self.lora_A[key], self.lora_B[key], self.scales[key] = a, b, scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        for key, a in self.lora_A.items():
            # scaling the small factor B costs r·out multiplications; scaling the output would cost batch·tokens·out
            out = out + self.low_rank(x, a, self.lora_B[key] * self.scales[key])
        return out

    def low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return linear_low_rank(x, a, b)


class LoRAEmbeddingWrapper(LoRAWrapper):
    def low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return embedding_low_rank(x, a, b, self.base.padding_idx)


def linear_low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(x Aᵀ) Bᵀ: the LoRA path of a Linear or Conv1D, never forming B·A."""
    return F.linear(F.linear(x, a), b)


def embedding_low_rank(ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, padding_idx: int | None = None
                       ) -> torch.Tensor:
    """The LoRA path of an embedding: each token id picks its column of A ([r, vocab]), then Bᵀ."""
    return F.embedding(ids, a.T, padding_idx=padding_idx) @ b.T


def _features(module: torch.nn.Module) -> tuple[type[LoRAWrapper], int, int]:
    """Wrapper type, in and out features of a module LoRA can adapt."""
    if isinstance(module, torch.nn.Linear):
        return LoRAWrapper, module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return LoRAWrapper, module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, torch.nn.Embedding):
        return LoRAEmbeddingWrapper, module.num_embeddings, module.embedding_dim
    raise AdapterError(f"LoRA can be attached to Linear, Conv1D and Embedding modules, not {type(module).__name__}")


def attach(handle, index: int, component, tensors, weight: float) -> None:
    for target in component.targets:
        path = handle.resolve(component.name, target)
        base = innermost(handle.model.get_submodule(path))
        wrapper_type, in_features, out_features = _features(base)
        a, b = tensors[target]["lora_A"], tensors[target]["lora_B"]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(f"component {component.name!r}, target {target!r}: lora_A {list(a.shape)} and lora_B "
                               f"{list(b.shape)} do not fit {path} ({in_features} in, {out_features} out)")
        s = scale(a.shape[0], component.param(target, "alpha"), component.param(target, "scaling", "standard"))
        like = base.weight
        wrapper = handle.wrapper(path, wrapper_type)
        wrapper.add(f"{index}_{component.name}",
                    handle.parameter(index, f"{component.name}.{target}.lora_A", a, like),
                    handle.parameter(index, f"{component.name}.{target}.lora_B", b, like),
                    s * weight)
