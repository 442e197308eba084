"""Prefix tuning (Li & Liang 2021): per attention layer, p trained key and value vectors are prepended to the
layer's keys and values, and the attention mask grows by p. A target (an attention module) holds ``prefix_key`` and
``prefix_value``, each of shape [kv_heads, p, head_dim]. A prefix changes activations, not weights: it cannot be
folded into a checkpoint."""

from __future__ import annotations

from adapterkit.errors import AdapterError
from adapterkit.kinds import Kind


class Prefix(Kind):
    name = "prefix"
    roles = ("prefix_key", "prefix_value")

    def check(self, component, tensors) -> None:
        length = component.params.get("prefix_length")
        for target in component.targets:
            key, value = tensors[target]["prefix_key"], tensors[target]["prefix_value"]
            where = f"component {component.name!r}, target {target!r}"
            if key.ndim != 3 or key.shape != value.shape:
                raise AdapterError(
                    f"{where}: prefix_key and prefix_value must both be [kv_heads, p, head_dim], "
                    f"got {list(key.shape)} and {list(value.shape)}"
                )
            if key.shape[1] != length:
                raise AdapterError(f"{where}: manifest says prefix_length {length} but prefix_key is {list(key.shape)}")

    def unmergeable_reason(self, component) -> str:
        return (f"component {component.name!r} is a prefix: it adds key/value vectors, not weight deltas, so it cannot "
                "be merged into a checkpoint; attach it (adapterkit.attach) or export it "
                "(adapterkit export --onnx --unmerged)")
