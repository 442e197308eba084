"""LoRA in torch: the forward, the merge, the training start.

Forward (Hu et al. 2021, eq. 3): y = base(x) + (x Aᵀ)(s·w·B)ᵀ, never forming ΔW = B·A, on ``nn.Linear``,
transformers' ``Conv1D`` (GPT-2, which stores its weight as [in, out]: the low-rank path is the same, only the base
layout differs), ``nn.Embedding`` (the token ids pick columns of A: F.embedding(x, Aᵀ)·Bᵀ, as PEFT does) and
``nn.Conv2d`` (A [r, in, kh, kw] is a convolution with the base's stride, padding, dilation and padding mode, B
[out, r, 1, 1] a 1×1 convolution after it, as kohya and PEFT compute it). Scaling the small factor B costs r·out
multiplications; scaling the output would cost batch·tokens·out.

Merge: W ← W + w·s·B·A in one GEMM pass over W (``addmm_``, ΔW never formed), transposed where the base stores the
weight as [in, out] (``fan_in_fan_out``); on a Conv2d, over W viewed as [out, in·kh·kw] with A and B flattened.
Unmerge subtracts the same.

Training start (PEFT's default): A ~ kaiming-uniform(a=√5) as ``nn.Linear`` (``nn.Conv2d``) initialises weights,
B = 0, so ΔW = 0 and the model starts as the base.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from adapterkit import targets
from adapterkit.arrays import to_torch
from adapterkit.attach.wrapper import innermost
from adapterkit.errors import RequestError
from adapterkit.kinds.lora import target_scale
from adapterkit.kinds.runtime import Runtime, in_dtype


ADAPTED = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv2d)


def low_rank(base: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(x Aᵀ) Bᵀ for a Linear or Conv1D; for an Embedding, each token id picks its column of A ([r, vocab]), then Bᵀ;
    for a Conv2d, A's convolution with the base's geometry (its own ``_conv_forward``: stride, padding, dilation,
    padding mode), then B's 1×1 convolution."""
    if isinstance(base, torch.nn.Embedding):
        return F.embedding(x, a.T, padding_idx=base.padding_idx) @ b.T
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(base._conv_forward(x, a, None), b)
    return F.linear(F.linear(x, a), b)


def features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of a module LoRA can adapt (channels for a Conv2d)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise RequestError(f"LoRA adapts Conv2d modules with groups=1, not groups={module.groups}")
        return module.in_channels, module.out_channels
    raise RequestError(f"LoRA adapts Linear, Conv1D, Embedding and Conv2d modules, not {type(module).__name__}")


class LoRARuntime(Runtime):
    dynamic_axes = {"lora_A": 0, "lora_B": 1}
    merged_parameters = ("weight",)

    def after(self, base, x, y, tensors, scale):
        a = tensors["lora_A"]
        b = tensors["lora_B"] if scale == 1.0 else tensors["lora_B"] * scale
        return y + in_dtype(low_rank(base, in_dtype(x, a.dtype), a, b), y.dtype)

    def after_each(self, base, x, y, parts, memo):
        """A mixed batch (every entry on its own rows): all adapters in one gathered product, as Punica's BGMV does.
        Their factors are stacked, ranks padded with zeros to the largest (exact: a zero row of A and column of B add
        nothing), one slot of zeros for the rows without an adapter; each row takes its slot's A and s·B."""
        if len(parts) < 2 or any(rows is None for _, _, rows in parts) or isinstance(innermost(base), torch.nn.Embedding):
            return super().after_each(base, x, y, parts, memo)
        a, b = self._stacked(parts, memo)
        slot = torch.full((x.shape[0],), len(parts), dtype=torch.long, device=x.device)
        for i, (_, _, rows) in enumerate(parts):
            slot[rows] = i
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
        low = torch.bmm(flat, a[slot].transpose(1, 2))  # x Aᵀ per row: [batch, tokens, r_max]
        return y + torch.bmm(low, b[slot].transpose(1, 2)).reshape(y.shape)

    @staticmethod
    def _stacked(parts, memo) -> tuple[torch.Tensor, torch.Tensor]:
        """A [n+1, r_max, in] and s·B [n+1, out, r_max], zero-padded, the last slot zeros; kept in ``memo`` while
        the tensors are unchanged (their versions) and no gradient is wanted."""
        tensors = [(held["lora_A"], held["lora_B"]) for held, _, _ in parts]
        key = (tuple((id(t), t._version, t.device, t.dtype) for pair in tensors for t in pair)  # moved: restack
               + tuple(s for _, s, _ in parts))
        reuse = not torch.is_grad_enabled() or not any(t.requires_grad for pair in tensors for t in pair)
        if reuse and memo.get("lora_key") == key:
            return memo["lora_stacked"]
        rank = max(a.shape[0] for a, _ in tensors)
        a_out = tensors[0][0].new_zeros(len(parts) + 1, rank, tensors[0][0].shape[1])
        b_out = tensors[0][1].new_zeros(len(parts) + 1, tensors[0][1].shape[0], rank)
        for i, ((a, b), (_, scale, _)) in enumerate(zip(tensors, parts)):
            a_out[i, :a.shape[0]] = a
            b_out[i, :, :b.shape[1]] = b if scale == 1.0 else b * scale
        if reuse:
            memo["lora_key"], memo["lora_stacked"] = key, (a_out, b_out)
        return a_out, b_out

    def scale(self, component, target, roles, weight) -> float:
        return target_scale(component, target, roles["lora_A"].shape[0]) * weight

    def fold(self, component, target, roles, weight):
        scale = self.scale(component, target, roles, weight)
        return {"lora_A": to_torch(roles["lora_A"]).float(), "lora_B": to_torch(roles["lora_B"]).float() * scale}

    def check_fits(self, module, path, component, target, roles) -> None:
        base = innermost(module)
        in_features, out_features = features(base)
        a, b = roles["lora_A"], roles["lora_B"]
        conv = isinstance(base, torch.nn.Conv2d)
        kernel = list(base.kernel_size) if conv else []
        if a.shape[1] != in_features or b.shape[0] != out_features or list(a.shape[2:]) != kernel:
            raise RequestError(f"component {component.name!r}, target {target!r}: lora_A {list(a.shape)} and lora_B "
                               f"{list(b.shape)} do not fit {path} ({in_features} in, {out_features} out"
                               + (f", kernel {kernel}" if conv else "") + ")")

    def merge(self, component, target, roles, parameter, tensor, weight):
        self._add(component, target, roles, tensor, weight)

    def unmerge(self, component, target, roles, parameter, tensor, weight, record):
        self._add(component, target, roles, tensor, -weight)

    def _add(self, component, target, roles, tensor, weight) -> None:
        """tensor += w·s·B·A (or its transpose), in one GEMM pass: ΔW itself is never formed. A convolution's
        weight [out, in, kh, kw] is updated as the matrix [out, in·kh·kw] it is in memory."""
        a, b = to_torch(roles["lora_A"]).to(tensor.dtype), to_torch(roles["lora_B"]).to(tensor.dtype)
        expected = [b.shape[0], *a.shape[1:]]
        transposed = bool(component.param(target, "fan_in_fan_out", False))
        if list(tensor.shape) != (expected[::-1] if transposed else expected):
            raise RequestError(f"component {component.name!r}, target {target!r}: the update is "
                               f"{expected[::-1] if transposed else expected}, the base weight {list(tensor.shape)}")
        alpha = self.scale(component, target, roles, weight)
        if not abs(alpha) <= torch.finfo(tensor.dtype).max:  # beyond the dtype (1e300): scale B, which overflows,
            b, alpha = b * alpha, 1.0                        # and the merge refuses the non-finite tensor by name
        if a.ndim > 2:  # a Conv2d: A [r, in, kh, kw], B [out, r, 1, 1]; the weight is contiguous (merge's buffer)
            tensor.view(tensor.shape[0], -1).addmm_(b.reshape(b.shape[0], b.shape[1]), a.reshape(a.shape[0], -1),
                                                     alpha=alpha)
        elif transposed:
            tensor.addmm_(a.T, b.T, alpha=alpha)  # ΔWᵀ = s·Aᵀ·Bᵀ
        else:
            tensor.addmm_(b, a, alpha=alpha)

    def candidates(self, model, head):
        return [name for name, module in model.named_modules()
                if isinstance(module, ADAPTED) and targets.outside(name, head)]

    def default_targets(self, model, head):
        found = targets.query_value_projections(model, head)
        if not found:
            raise RequestError(f"found no query/value projections in {type(model).__name__}: pass --targets")
        return found

    def initial(self, model, names, options, generator):
        rank = options["rank"]
        tensors, layouts = {}, {}
        for name in names:
            module = model.get_submodule(name)
            in_features, out_features = features(module)
            if rank > min(in_features, out_features):  # more is no more expressive, only memory
                raise RequestError(f"--rank {rank} is more than {name} can use (at most min(in, out) = "
                                   f"{min(in_features, out_features)})")
            if isinstance(module, torch.nn.Embedding):  # PEFT: A = 0, B ~ N(0, 1) for embeddings
                tensors[name] = {"lora_A": torch.zeros(rank, in_features),
                                 "lora_B": torch.randn(out_features, rank, generator=generator)}
            elif isinstance(module, torch.nn.Conv2d):  # kaiming_uniform_(a=√5) as nn.Conv2d initialises its weight
                a = torch.empty(rank, in_features, *module.kernel_size)
                bound = 1 / math.sqrt(a[0].numel())
                tensors[name] = {"lora_A": a.uniform_(-bound, bound, generator=generator),
                                 "lora_B": torch.zeros(out_features, rank, 1, 1)}
            else:
                a = torch.empty(rank, in_features)
                bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=√5) on a [rank, in] matrix, as nn.Linear does
                tensors[name] = {"lora_A": a.uniform_(-bound, bound, generator=generator),
                                 "lora_B": torch.zeros(out_features, rank)}
            layouts[name] = isinstance(module, (Conv1D, torch.nn.Embedding))  # stored [in, out]: ΔWᵀ is added
        # the most common layout is the component's (GPT-2: every target a Conv1D); the others override it
        common = sum(layouts.values()) * 2 > len(layouts)
        target_params = {name: {"fan_in_fan_out": layout} for name, layout in layouts.items() if layout != common}
        params = {"rank": rank, "alpha": options["alpha"], "scaling": "standard", "fan_in_fan_out": common}
        return params, target_params, tensors


RUNTIME = LoRARuntime()
