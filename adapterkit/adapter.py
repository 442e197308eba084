"""The Adapter value: a manifest and named tensors. Plain data, no ``torch.nn``.

Tensor names are ``<component>.<target>.<role>``: the component name has no dots, the role is the last dot-separated
part, and the target (a module path of the base model, which has dots) is everything between.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from adapterkit.errors import AdapterError
from adapterkit.manifest import Component, Manifest


def tensor_name(component: str, target: str, role: str) -> str:
    return f"{component}.{target}.{role}"


def split_tensor_name(name: str) -> tuple[str, str, str]:
    """``"c.model.layers.0.q_proj.lora_A"`` -> ``("c", "model.layers.0.q_proj", "lora_A")``."""
    component, _, rest = name.partition(".")
    target, _, role = rest.rpartition(".")
    if not component or not target or not role:
        raise AdapterError(f"tensor name {name!r} is not <component>.<target>.<role>")
    return component, target, role


@dataclass
class Adapter:
    manifest: Manifest
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def components(self) -> list[Component]:
        return self.manifest.components

    def component(self, name: str) -> Component:
        return self.manifest.component(name)

    def component_tensors(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """``{target: {role: tensor}}`` for one component."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for tensor_key, tensor in self.tensors.items():
            component, target, role = split_tensor_name(tensor_key)
            if component == name:
                grouped.setdefault(target, {})[role] = tensor
        return grouped

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def content_sha256(self) -> str:
        """sha256 of the content (manifest, then each tensor's name, dtype, shape and bytes in name order): the same
        for a file and the value loaded from it, whatever the byte layout of the file."""
        digest = hashlib.sha256(self.manifest.dumps().encode())
        for key in sorted(self.tensors):
            tensor = self.tensors[key].detach().contiguous()
            digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def validate(self) -> None:
        """Raise AdapterError if tensors and manifest disagree (the rules of spec/SPEC.md §5)."""
        from adapterkit.validation import check_adapter

        check_adapter(self.manifest, self.tensors)
