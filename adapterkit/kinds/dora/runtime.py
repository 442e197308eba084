"""DoRA in torch: the forward, the merge and its inverse, the training start.

Forward, as PEFT computes it (``peft/tuners/lora/dora.py``), with g = m / ‖W + s·B·A‖ per output row:

    y = base(x) + (g − 1) ⊙ (x Wᵀ) + g ⊙ s·(x Aᵀ) Bᵀ          (= x W'ᵀ + b, W' = g ⊙ (W + s·B·A))

on ``nn.Linear``, transformers' ``Conv1D`` (weight stored [in, out]) and ``nn.Embedding`` (stored [V, d]; its math
layout is [d, V], so m has one entry per embedding dimension, as PEFT's ``DoraEmbeddingLayer``). x Wᵀ is the base
output without its bias when this entry is the first on its module (PEFT's ``result - bias``); after other entries
(BitFit's Δb) it is recomputed from x, so that only W x is rescaled. The norm is computed from detached tensors and
receives no gradient, as Liu et al. (§4.3) and PEFT do. Its cost: one [out, in] product B·A per call.

Merge: W ← g ⊙ (W + s·B·A), returning ``{"norm": ‖W + s·B·A‖}``: the inverse needs it, and the merged weights do not
give it (‖W'‖ is m, not the norm). Unmerge: W = W' / g − s·B·A.

Training start: LoRA's (A kaiming-uniform, B = 0; embeddings A = 0, B normal) and m = ‖W‖, so g = 1: the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from adapterkit.arrays import to_torch
from adapterkit.attach.wrapper import AdapterWrapper, innermost, share_rows
from adapterkit.errors import RequestError
from adapterkit.kinds.dora import UNWEIGHTED
from adapterkit.kinds.lora import target_scale
from adapterkit.kinds.lora.runtime import RUNTIME as LORA
from adapterkit.kinds.lora.runtime import low_rank
from adapterkit.kinds.runtime import Runtime, in_dtype

ADAPTED = (torch.nn.Linear, Conv1D, torch.nn.Embedding)


def math_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight in the math layout [out, in] (a view: Conv1D and Embedding store it transposed)."""
    weight = module.weight
    return weight.T if isinstance(module, (Conv1D, torch.nn.Embedding)) else weight


def features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of a module DoRA can adapt."""
    if not isinstance(module, ADAPTED):
        raise RequestError(f"DoRA adapts Linear, Conv1D and Embedding modules, not {type(module).__name__}")
    out_features, in_features = math_weight(module).shape
    return in_features, out_features


def dense_math_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The module's weight in the math layout as a plain tensor in ``dtype``: a weight held quantized
    (:mod:`adapterkit.precision`) is dequantized, as PEFT's DoRA does over a quantized base."""
    from adapterkit.precision import dense

    weight = dense(module.weight.detach(), dtype)
    return weight.T if isinstance(module, (Conv1D, torch.nn.Embedding)) else weight


def row_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖W + B·A‖ per output row (``b`` holds the scale), from detached tensors, in the adapter's dtype: no gradient
    flows through it."""
    directed = in_dtype(weight.detach(), a.dtype) + b.detach() @ a.detach()
    return torch.linalg.norm(directed, dim=1)


class DoRARuntime(Runtime):
    dynamic_axes = {"lora_A": 0, "lora_B": 1}  # the magnitude has the fixed shape [out]
    merged_parameters = ("weight",)
    empty_reads = ("weight",)

    def __init__(self, first: bool = True):
        #: whether this entry is the first on its module (then base(x) − b is x Wᵀ)
        self.first = first

    def after(self, base, x, y, tensors, scale):
        module = innermost(base)
        a, b, magnitude = tensors["lora_A"], tensors["lora_B"], tensors["magnitude"]
        if scale != 1.0:
            b = b * scale
        g = magnitude / row_norm(dense_math_weight(module, a.dtype), a, b)
        if not self.first:
            product = (F.embedding(x, module.weight, padding_idx=module.padding_idx)
                       if isinstance(module, torch.nn.Embedding) else F.linear(x, math_weight(module)))
        else:
            bias = getattr(module, "bias", None)
            product = y if bias is None else y - bias
        change = (g - 1) * in_dtype(product, a.dtype) + g * low_rank(module, in_dtype(x, a.dtype), a, b)
        return y + in_dtype(change, y.dtype)

    def scale(self, component, target, roles, weight) -> float:
        return target_scale(component, target, roles["lora_A"].shape[0]) * weight

    def fold(self, component, target, roles, weight):
        scale = self.scale(component, target, roles, weight)
        return {"lora_A": to_torch(roles["lora_A"]).float(), "lora_B": to_torch(roles["lora_B"]).float() * scale,
                "magnitude": to_torch(roles["magnitude"]).float()}

    def combine(self, role, tensors):
        if len(tensors) > 1:
            raise RequestError("two DoRA components act on one module: their magnitudes cannot be combined into one "
                               "graph input (export them as separate graphs)")
        return tensors[0]

    def empty(self, role, example, module):
        if role == "magnitude":  # m = ‖W‖ with rank 0: g = 1, the base
            return torch.linalg.norm(dense_math_weight(innermost(module), torch.float32), dim=1)
        return super().empty(role, example, module)

    def check_fits(self, module, path, component, target, roles) -> None:
        in_features, out_features = features(innermost(module))
        a, b, magnitude = roles["lora_A"], roles["lora_B"], roles["magnitude"]
        if a.shape[1] != in_features or b.shape[0] != out_features or magnitude.shape[0] != out_features:
            raise RequestError(f"component {component.name!r}, target {target!r}: lora_A {list(a.shape)}, lora_B "
                               f"{list(b.shape)} and magnitude {list(magnitude.shape)} do not fit {path} "
                               f"({in_features} in, {out_features} out)")

    def install(self, handle, path, key, source, scale, component=None, target=None) -> None:
        """DoRA acts first on its module (the registry's order), so only another DoRA of this attach, or an entry
        of an earlier attach (a wrapper inside this one), can act before it (on the same rows)."""
        wrapper = handle.wrapper(path)
        earlier = [entry for entry in wrapper.entries if entry.runtime.kind == self.kind]
        module = wrapper.base
        while isinstance(module, AdapterWrapper):  # attached before, by another handle
            earlier, module = module.entries + earlier, module.base
        earlier = [entry for entry in earlier if share_rows(entry.source, source)]  # per-row: other adapters' rows
        for entry in earlier:
            if isinstance(entry.runtime, DoRARuntime):
                raise RequestError(f"{path} already carries a DoRA component: two magnitudes cannot act on one "
                                   "weight (attach one of them)")
            if "weight" in entry.runtime.merged_parameters:
                raise RequestError(f"{path}: attach the DoRA component before the other adapters that change this "
                                   "weight (its norm is taken of the base weight, as merging in that order does)")
        wrapper.add(key, self if not earlier else AFTER_OTHERS, source, scale)

    # -- merge ----------------------------------------------------------------------------------------------------

    def merge(self, component, target, roles, parameter, tensor, weight):
        a, b, magnitude, rows = self._prepare(component, target, roles, tensor, weight, "merged")
        view = tensor.T if rows == 0 else tensor  # the math layout [out, in], a view of the stored tensor
        view.addmm_(b, a)  # W + s·B·A
        norm = torch.linalg.norm(view, dim=1)
        view.mul_((magnitude / norm).unsqueeze(1))
        return {"norm": norm}

    def unmerge(self, component, target, roles, parameter, tensor, weight, record):
        if not record or "norm" not in record:
            raise RequestError(f"component {component.name!r}, target {target!r}: a merged DoRA component cannot be "
                               "unmerged without the row norms its merge kept (the merged weights do not give "
                               "them): merge again from the base")
        a, b, magnitude, rows = self._prepare(component, target, roles, tensor, weight, "unmerged")
        view = tensor.T if rows == 0 else tensor
        view.div_((magnitude / record["norm"].to(tensor.dtype)).unsqueeze(1))
        view.addmm_(b, a, alpha=-1)

    def _prepare(self, component, target, roles, tensor, weight, stage):
        """A, s·B and m in the tensor's dtype, and the axis of the stored tensor that holds output rows (0 for the
        math layout, 1 when ``fan_in_fan_out``); refuses a weight other than 1 and a tensor of another shape."""
        if weight != 1:
            raise RequestError(f"component {component.name!r} is a dora with weight {weight:g}: it cannot be "
                               f"{stage} with a weight ({UNWEIGHTED}); use weight 1")
        a = to_torch(roles["lora_A"]).to(tensor.dtype)
        b = to_torch(roles["lora_B"]).to(tensor.dtype) * self.scale(component, target, roles, 1.0)
        magnitude = to_torch(roles["magnitude"]).to(tensor.dtype)
        expected = [b.shape[0], a.shape[1]]
        transposed = bool(component.param(target, "fan_in_fan_out", False))
        if list(tensor.shape) != (expected[::-1] if transposed else expected):
            raise RequestError(f"component {component.name!r}, target {target!r}: the update is "
                               f"{expected[::-1] if transposed else expected}, the base weight {list(tensor.shape)}")
        return a, b, magnitude, (0 if transposed else 1)

    # -- training -------------------------------------------------------------------------------------------------

    # LoRA's modules and defaults: the query and value projections
    candidates = type(LORA).candidates
    default_targets = type(LORA).default_targets

    def initial(self, model, names, options, generator):
        params, target_params, tensors = LORA.initial(model, names, options, generator)
        for name, roles in tensors.items():  # B·A = 0 at the start (B = 0, or A = 0 on embeddings): m = ‖W‖, g = 1
            roles["magnitude"] = torch.linalg.norm(dense_math_weight(model.get_submodule(name), torch.float32), dim=1)
        return params, target_params, tensors


RUNTIME = DoRARuntime()
#: the entry installed after other entries on one module: it recomputes x Wᵀ from x
AFTER_OTHERS = DoRARuntime(first=False)
