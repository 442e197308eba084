"""The Adapter value: a manifest and named tensors. Plain data: numpy arrays, no framework.

Tensor names are ``<component>.<target>.<role>``: the component name has no dots, the role is the last dot-separated
part, and the target (a module path of the base model, which has dots) is everything between. Tensors given as torch
tensors are turned into numpy arrays (see :mod:`adapterkit.arrays`); use :func:`adapterkit.arrays.to_torch` to run them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from adapterkit.arrays import DIGEST_NAMES, as_array
from adapterkit.errors import FormatError
from adapterkit.manifest import Component, Manifest


def tensor_name(component: str, target: str, role: str) -> str:
    return f"{component}.{target}.{role}"


def split_tensor_name(name: str) -> tuple[str, str, str]:
    """``"c.model.layers.0.q_proj.lora_A"`` -> ``("c", "model.layers.0.q_proj", "lora_A")``."""
    component, _, rest = name.partition(".")
    target, _, role = rest.rpartition(".")
    if not component or not target or not role:
        raise FormatError(f"tensor name {name!r} is not <component>.<target>.<role>")
    return component, target, role


@dataclass
class Adapter:
    manifest: Manifest
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors = {name: as_array(tensor) for name, tensor in self.tensors.items()}

    @property
    def components(self) -> list[Component]:
        return self.manifest.components

    def component(self, name: str) -> Component:
        return self.manifest.component(name)

    def component_tensors(self, name: str) -> dict[str, dict[str, np.ndarray]]:
        """``{target: {role: tensor}}`` for one component."""
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for tensor_key, tensor in self.tensors.items():
            component, target, role = split_tensor_name(tensor_key)
            if component == name:
                grouped.setdefault(target, {})[role] = tensor
        return grouped

    def parameter_count(self) -> int:
        return sum(int(t.size) for t in self.tensors.values())

    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    def content_sha256(self) -> str:
        """sha256 of the content (manifest, then each tensor's name, dtype, shape and bytes in name order): the same
        for a file and the value loaded from it, whatever the byte layout of the file."""
        digest = hashlib.sha256(self.manifest.dumps().encode())
        for key in sorted(self.tensors):
            tensor = np.ascontiguousarray(self.tensors[key])
            dtype = DIGEST_NAMES.get(tensor.dtype, str(tensor.dtype))
            digest.update(f"{key}:{dtype}:{list(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(np.uint8).tobytes())
        return digest.hexdigest()

    def validate(self) -> None:
        """Raise FormatError if tensors and manifest disagree (the rules of spec/SPEC.md §5-§6)."""
        from adapterkit.validation import check_adapter

        check_adapter(self.manifest, self.tensors)
