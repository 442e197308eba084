"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Per attention layer, p trained key and value vectors are prepended to the layer's keys and values, and the attention
mask grows by p. A target (the attention module whose attention call reads the prefix) holds ``prefix_key`` and
``prefix_value``, each of shape [kv_heads, p, head_dim]. A prefix changes activations, not weights: it cannot be
folded into a checkpoint, and it cannot be weighted (its keys enter a softmax). Composition concatenates the prefixes
along the virtual-token axis (p = Σ pᵢ), over the same attention modules.
"""

from __future__ import annotations

import numpy as np

from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.base import Composed, Kind, TrainOption
from adapterkit.manifest import Component

ROLES = ("prefix_key", "prefix_value")
PREFIX_LENGTH = TrainOption("prefix_length", "count", 8, "Prefix tuning: virtual tokens per layer.")


class Prefix(Kind):
    name = "prefix"
    summary = "trained key/value vectors prepended in attention"
    roles = ROLES
    weighted = False
    unweighted_reason = "its keys enter the attention softmax"
    unmergeable = "it adds key/value vectors, not weight deltas, so it cannot be merged into a checkpoint"
    default_lr = 1e-2  # prefix tuning needs a larger rate than LoRA (Li & Liang 2021)
    train_options = (PREFIX_LENGTH,)

    def check(self, component, tensors) -> None:
        length = component.params.get("prefix_length")
        for target in component.targets:
            key, value = tensors[target]["prefix_key"], tensors[target]["prefix_value"]
            where = f"component {component.name!r}, target {target!r}"
            if key.ndim != 3 or key.shape != value.shape:
                raise FormatError(f"{where}: prefix_key and prefix_value must both be [kv_heads, p, head_dim], "
                                  f"got {list(key.shape)} and {list(value.shape)}")
            if key.shape[1] != length:
                raise FormatError(f"{where}: manifest says prefix_length {length} but prefix_key is {list(key.shape)}")

    def positions(self, component) -> int:
        return int(component.params.get("prefix_length", 0))

    def describe(self, component, tensors) -> dict:
        return {"prefix_length": component.params.get("prefix_length")}

    def detail(self, entry) -> str:
        return f"prefix length {entry['prefix_length']}"

    def compose(self, parts, request, name) -> Composed:
        first = parts[0]
        for part in parts:
            if part.weight != 1:
                raise RequestError(f"{part.where} is a prefix with weight {part.weight:g}: a prefix cannot be weighted "
                                   "(its keys enter the attention softmax); give its input weight 1")
            if set(part.component.targets) != set(first.component.targets):
                raise RequestError(f"prefixes of {first.where} and {part.where} cover different attention modules: "
                                   "they can only be concatenated over the same targets")
        held = {}
        for target in first.component.targets:
            shapes = {(p.tensors[target]["prefix_key"].shape[0], p.tensors[target]["prefix_key"].shape[2])
                      for p in parts}
            if len(shapes) > 1:
                raise RequestError(f"target {target!r}: shapes disagree, prefixes have [kv_heads, head_dim] "
                                   f"{sorted(shapes)}")
            held[target] = {role: np.concatenate([p.tensors[target][role] for p in parts], axis=1) for role in ROLES}
        length = sum(int(p.component.params["prefix_length"]) for p in parts)
        return Composed(Component(name, self.name, list(held), {**first.component.params, "prefix_length": length}),
                        held)
