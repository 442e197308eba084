"""The rules an adapter's manifest and tensors must keep together (spec/SPEC.md §4-§6), in one place.

The reader calls :func:`check_adapter` on every file it loads and the writer on every adapter it saves, so code past
the edge can trust its input.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Mapping

import jsonschema
import torch

from adapterkit.adapter import split_tensor_name
from adapterkit.errors import AdapterError
from adapterkit.kinds import get_kind
from adapterkit.manifest import Manifest

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def manifest_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(resources.files("adapterkit").joinpath("schema/manifest.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def check_manifest_json(data: object) -> None:
    """Raise AdapterError naming the first place where ``data`` breaks the manifest schema."""
    if not isinstance(data, dict):
        raise AdapterError("manifest is not a JSON object")
    components = data.get("components")
    if isinstance(components, list):
        _check_unique_names(components)
    error = jsonschema.exceptions.best_match(manifest_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise AdapterError(f"manifest at {where}: {error.message}")


def _check_unique_names(components: list) -> None:
    seen: set[str] = set()
    for component in components:
        if not isinstance(component, dict):
            continue
        name = component.get("name")
        if not isinstance(name, str):
            continue  # the schema names the problem
        if name in seen:
            raise AdapterError(f"two components are named {name!r}")
        seen.add(name)
        targets = component.get("targets")
        if isinstance(targets, list):
            duplicated = sorted({t for t in targets if isinstance(t, str) and targets.count(t) > 1})
            if duplicated:
                raise AdapterError(f"component {name!r} names target {duplicated[0]!r} twice")


def check_adapter(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise AdapterError (without a path; the caller adds it) if ``tensors`` disagree with ``manifest``."""
    check_manifest_json(json.loads(manifest.dumps()))
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = {c.name: {} for c in manifest.components}
    components = {c.name: c for c in manifest.components}
    for name, tensor in tensors.items():
        component_name, target, role = split_tensor_name(name)
        component = components.get(component_name)
        if component is None:
            raise AdapterError(f"tensor {name!r} belongs to no component of the manifest")
        if target not in component.targets:
            raise AdapterError(f"tensor {name!r}: target {target!r} is not among component {component_name!r}'s targets")
        kind = get_kind(component.kind)
        if kind.roles is not None and role not in kind.roles:
            raise AdapterError(f"tensor {name!r}: a {kind.name} target holds {', '.join(kind.roles)}, not {role!r}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"tensor {name!r} has dtype {tensor.dtype}, adapter tensors must be F16, BF16, F32 or F64")
        if tensor.numel() == 0:
            raise AdapterError(f"tensor {name!r} has no elements (shape {list(tensor.shape)})")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor {name!r} contains NaN or Inf")
        grouped[component_name].setdefault(target, {})[role] = tensor
    _check_full_tensors_replaced_once(manifest, grouped)
    for component in manifest.components:
        kind = get_kind(component.kind)
        held = grouped[component.name]
        for target in component.targets:
            present = held.get(target, {})
            missing = [r for r in (kind.roles or ()) if r not in present]
            if missing or not present:
                what = ", ".join(missing) if missing else "any tensor"
                raise AdapterError(f"component {component.name!r}, target {target!r}: missing {what}")
        kind.check(component, held)


def _check_full_tensors_replaced_once(manifest: Manifest, grouped: Mapping[str, Mapping[str, Mapping]]) -> None:
    """Two ``full`` components must not replace the same base tensor (which one would win?)."""
    owner: dict[str, str] = {}
    for component in manifest.components:
        if component.kind != "full":
            continue
        for target, roles in grouped[component.name].items():
            for role in roles:
                replaced = f"{target}.{role}"
                if replaced in owner:
                    raise AdapterError(
                        f"components {owner[replaced]!r} and {component.name!r} both replace {replaced!r}")
                owner[replaced] = component.name
