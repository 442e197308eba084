"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning"): only bias terms are trained.

A target holds ``bias``, the delta Δb added to the base module's bias (a base module without a bias gets one that
starts at zero). Composition adds: Δb = Σ wᵢ Δbᵢ over the union of targets.
"""

from __future__ import annotations

import numpy as np

from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.base import Composed, Kind
from adapterkit.manifest import Component


class BitFit(Kind):
    name = "bitfit"
    summary = "bias updates Δb"
    roles = ("bias",)
    default_lr = 1e-3

    def check(self, component, tensors) -> None:
        for target in component.targets:
            bias = tensors[target]["bias"]
            if bias.ndim != 1:
                raise FormatError(
                    f"component {component.name!r}, target {target!r}: bias must be 1-D, got {list(bias.shape)}")

    def compose(self, parts, request, name) -> Composed:
        held: dict[str, dict[str, np.ndarray]] = {}
        owner = {}
        for part in parts:
            for target in part.component.targets:
                bias = part.tensors[target]["bias"].astype(np.float32) * np.float32(part.weight)
                if target not in held:
                    held[target], owner[target] = {"bias": bias}, part
                elif held[target]["bias"].shape != bias.shape:
                    raise RequestError(f"target {target!r}: shapes disagree, {owner[target].where} has bias "
                                       f"{list(held[target]['bias'].shape)} but {part.where} has {list(bias.shape)}")
                else:
                    held[target]["bias"] = held[target]["bias"] + bias
        return Composed(Component(name, self.name, list(held), {}), held)
