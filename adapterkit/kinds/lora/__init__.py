"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A target holds ``lora_A`` of shape [r, in] and ``lora_B`` of shape [out, r]; the weight delta is
ΔW = s·B·A with s = α/r (``scaling: standard``) or s = α/√r (``scaling: rslora``, Kalajdzievski 2023).
ΔW has the math layout [out, in]; when ``fan_in_fan_out`` is true the base stores the weight as [in, out]
(GPT-2's Conv1D, embeddings) and ΔWᵀ is added instead.

On a 2-D convolution (``nn.Conv2d``, weight [out, in, kh, kw]) the factors are stored as kohya and PEFT store them:
``lora_A`` [r, in, kh, kw] (a convolution with the base's kernel size, stride, padding and dilation) and ``lora_B``
[out, r, 1, 1] (a 1×1 convolution). Flattened, they are the matrices A [r, in·kh·kw] and B [out, r] of the same
rule, and ΔW = s·B·A reshaped to [out, in, kh, kw]; ``fan_in_fan_out`` is false there.

Composition: per target, the weighted sum Σ wᵢ sᵢ Bᵢ Aᵢ by one of the methods of :mod:`adapterkit.compose.methods`
(``concat`` exact, ``svd``/``ties``/``dare`` compressed). The result has ``scaling: standard`` and alpha = rank, so
s = 1: the weights and scales are folded into B.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.base import Composed, Kind, Part, TrainOption
from adapterkit.manifest import Component

#: dimensions of a Conv2d's factors: A [r, in, kh, kw], B [out, r, 1, 1]
CONV_NDIM = 4
RANK = TrainOption("rank", "count", 8, "LoRA rank r.")
ALPHA = TrainOption("alpha", "number", 16.0, "LoRA alpha (scale α/r).", low=-1e6, high=1e6)


def scale(rank: int, alpha: float, scaling: str = "standard") -> float:
    """s = α/r, or α/√r for rsLoRA."""
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    return alpha / rank


def target_scale(component: Component, target: str, rank: int) -> float:
    """The scale of one target, from its own (or the component's) alpha and scaling rule."""
    return scale(rank, component.param(target, "alpha"), component.param(target, "scaling", "standard"))


def coefficient(component: Component, target: str, rank: int, weight: float = 1.0) -> float:
    """w·s·r: the alpha that gives one target its whole scale under ``scaling: standard`` (s' = α/r), computed without
    dividing by the rank (exact for standard scaling: w·α)."""
    alpha = component.param(target, "alpha")
    if component.param(target, "scaling", "standard") == "rslora":
        return weight * alpha * math.sqrt(rank)
    return weight * alpha


def uniform_alpha(component: Component, ranks: dict[str, int], weight: float = 1.0,
                  round_alpha=float) -> tuple[float, dict[str, float]]:
    """One alpha α for all targets and, per target, the factor f to multiply B by so that a reader that knows one
    alpha and standard scaling (llama.cpp's GGUF LoRA; PEFT configs read without ``alpha_pattern`` and
    ``use_rslora``) gets the exact ΔW: α/rₜ · fₜBₜ·Aₜ = w·sₜ·Bₜ·Aₜ, with rₜ the rank of each target's tensors.

    α is the most common per-target coefficient w·sₜ·rₜ (those targets keep B as it is), never 0 (llama.cpp reads
    alpha 0 as "no scale"); ``round_alpha`` rounds it to what the file stores (float32 for GGUF)."""
    coefficients = {target: coefficient(component, target, rank, weight) for target, rank in ranks.items()}
    nonzero = [c for c in coefficients.values() if c != 0]
    alpha = round_alpha(Counter(nonzero).most_common(1)[0][0] if nonzero else component.params.get("rank", 1))
    if not math.isfinite(alpha) or alpha == 0:
        raise RequestError(f"component {component.name!r}: its scale {alpha} cannot be stored as one alpha")
    return alpha, {target: c / alpha for target, c in coefficients.items()}


class LoRA(Kind):
    name = "lora"
    summary = "low-rank weight updates ΔW = s·B·A"
    roles = ("lora_A", "lora_B")
    default_lr = 1e-3
    train_options = (RANK, ALPHA)

    def check(self, component, tensors) -> None:
        for target in component.targets:
            check_factors(component, target, tensors[target]["lora_A"], tensors[target]["lora_B"])

    def describe(self, component, tensors) -> dict:
        return {"ranks": sorted({int(roles["lora_A"].shape[0]) for roles in tensors.values()})}

    def detail(self, entry) -> str:
        text = f"rank {'/'.join(map(str, entry['ranks']))}, alpha {entry['params'].get('alpha')}"
        if entry["params"].get("scaling", "standard") != "standard":
            text += f" ({entry['params']['scaling']})"
        return text

    def compose(self, parts, request, name) -> Composed:
        from adapterkit.compose.methods import get_method
        from adapterkit.compose.parallel import map_ordered

        method = get_method(request.method)
        rng = np.random.default_rng(request.seed)  # DARE's drops, drawn target after target
        def combine(item):
            target, (terms, layout) = item
            stored = terms[0][0].shape[1:]  # [in] or, on a convolution, [in, kh, kw]
            low = method.combine([(flat_a(a), flat_b(b), c, w) for a, b, c, w in terms], request, rng)
            factors = {"lora_A": low.a.reshape(low.rank, *stored).astype(np.float32, copy=False),
                       "lora_B": low.b.reshape(*low.b.shape, *[1] * (len(stored) - 1)).astype(np.float32, copy=False)}
            return target, layout, low, factors

        items = lora_terms(parts).items()
        # the targets are independent: on the threads of the composition, but for a method drawing random numbers
        # (the draws must come target after target, as the seed promises)
        results = [combine(item) for item in items] if method.random else map_ordered(combine, items)
        held, ranks, layouts, per_target, norms = {}, {}, {}, {}, {}
        for target, layout, low, factors in results:
            if not method.exact:
                per_target[target] = {"absolute": low.absolute_error, "relative": low.relative_error,
                                      "rank": low.rank}
                norms[target] = low.norm
            held[target] = factors
            ranks[target], layouts[target] = low.rank, layout
        params, target_params = composite_params(ranks, layouts)
        return Composed(Component(name, self.name, list(held), params, target_params), held,
                        overall_error(per_target, norms))


def flat_a(a: np.ndarray) -> np.ndarray:
    """A as the matrix [r, in] (a convolution's [r, in, kh, kw] flattened to [r, in·kh·kw])."""
    return a if a.ndim == 2 else a.reshape(a.shape[0], -1)


def flat_b(b: np.ndarray) -> np.ndarray:
    """B as the matrix [out, r] (a convolution's [out, r, 1, 1])."""
    return b if b.ndim == 2 else b.reshape(b.shape[0], b.shape[1])


def is_conv(a: np.ndarray) -> bool:
    """Whether a target's ``lora_A`` is a convolution's (4-D)."""
    return a.ndim == CONV_NDIM


def check_factors(component: Component, target: str, a: np.ndarray, b: np.ndarray, conv: bool = True) -> None:
    """The shape rules of a pair of LoRA factors (spec §6.2): 2-D, or (``conv``) a 2-D convolution's A
    [r, in, kh, kw] and B [out, r, 1, 1] with ``fan_in_fan_out`` false."""
    where = f"component {component.name!r}, target {target!r}"
    if a.ndim == CONV_NDIM and conv:
        if b.ndim != CONV_NDIM or tuple(b.shape[2:]) != (1, 1):
            raise FormatError(f"{where}: a convolution's lora_A {list(a.shape)} needs lora_B of shape "
                              f"[out, r, 1, 1], got {list(b.shape)}")
        if component.param(target, "fan_in_fan_out", False):
            raise FormatError(f"{where}: a convolution's factors (4-D) cannot have fan_in_fan_out true")
    elif a.ndim != 2 or b.ndim != 2:
        raise FormatError(f"{where}: lora_A and lora_B must be 2-D"
                          + (" (or a Conv2d's [r, in, kh, kw] and [out, r, 1, 1])" if conv else "")
                          + f", got {list(a.shape)} and {list(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise FormatError(f"{where}: rank mismatch, lora_A is {list(a.shape)} (rank {a.shape[0]}) "
                          f"but lora_B is {list(b.shape)} (rank {b.shape[1]})")
    rank = component.param(target, "rank")
    if rank != a.shape[0]:
        raise FormatError(f"{where}: manifest says rank {rank} but lora_A is {list(a.shape)}")


def lora_terms(parts: Sequence[Part]) -> dict[str, tuple[list[tuple[np.ndarray, np.ndarray, float, float]], bool]]:
    """Per target (in first-seen order): its ``(A, B, wᵢ·sᵢ, wᵢ)`` terms and its fan_in_fan_out layout; refuses
    inputs whose layouts or shapes disagree on a target."""
    by_target: dict[str, list] = {}
    for part in parts:
        component = part.component
        for target in component.targets:
            a, b = part.tensors[target]["lora_A"], part.tensors[target]["lora_B"]
            coefficient = part.weight * target_scale(component, target, a.shape[0])
            if not math.isfinite(coefficient):
                raise RequestError(f"{part.where}, target {target!r}: weight times scale is not a finite number")
            fan_in_fan_out = bool(component.param(target, "fan_in_fan_out", False))
            by_target.setdefault(target, []).append((part, a, b, coefficient, fan_in_fan_out))
    terms = {}
    for target, entries in by_target.items():
        first, a0, b0, _, layout = entries[0]
        for part, a, b, _, fan_in_fan_out in entries[1:]:
            if fan_in_fan_out != layout:
                raise RequestError(f"target {target!r}: {first.where} has fan_in_fan_out={layout} but {part.where} "
                                   f"has {fan_in_fan_out}: refusing to mix weight layouts")
            if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.ndim != b0.ndim:
                raise RequestError(f"target {target!r}: shapes disagree, {first.where} updates "
                                   f"{[b0.shape[0], *a0.shape[1:]]} but {part.where} updates "
                                   f"{[b.shape[0], *a.shape[1:]]}")
        terms[target] = ([(a, b, c, part.weight) for part, a, b, c, _ in entries], layout)
    return terms


def composite_params(ranks: dict[str, int], layouts: dict[str, bool]) -> tuple[dict, dict]:
    """Component params from the most common rank and layout (alpha = rank: s = 1); targets that differ get
    ``target_params``."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    layout = Counter(layouts.values()).most_common(1)[0][0]
    params = {"rank": rank, "alpha": rank, "scaling": "standard", "fan_in_fan_out": layout}
    target_params = {}
    for target in ranks:
        override = {}
        if ranks[target] != rank:
            override.update(rank=ranks[target], alpha=ranks[target])
        if layouts[target] != layout:
            override["fan_in_fan_out"] = layouts[target]
        if override:
            target_params[target] = override
    return params, target_params


def overall_error(per_target: dict[str, dict], norms: dict[str, float]) -> dict:
    """Overall absolute error √Σₜ errorₜ² and relative error against √Σₜ‖ΔWₜ‖²_F (both 0 for an exact method)."""
    absolute = math.sqrt(sum(e["absolute"] ** 2 for e in per_target.values()))
    norm = math.sqrt(sum(n**2 for n in norms.values()))
    out = {"relative": absolute / norm if norm > 0 else 0.0, "absolute": absolute}
    if per_target:
        out["per_target"] = per_target
    return out
