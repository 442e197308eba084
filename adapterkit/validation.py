"""The rules an adapter's manifest and tensors must keep together (spec/SPEC.md §4-§6), in one place.

The reader calls :func:`check_adapter` on every file it loads and the writer on every adapter it saves, so code past
the edge can trust its input. The general rules live here; each kind's own rules live in its package
(:meth:`adapterkit.kinds.Kind.check`).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Mapping

import numpy as np

from adapterkit.adapter import split_tensor_name
from adapterkit.arrays import FLOAT_DTYPES, all_finite
from adapterkit.errors import FormatError
from adapterkit.kinds import get_kind
from adapterkit.manifest import Manifest


@functools.cache
def manifest_validator():
    """The schema's validator, with ``pattern`` read as JSON Schema means it (ECMA-262: ``$`` is the end of the
    string; Python's ``$`` would also match before a final newline, letting ``"name\\n"`` through)."""
    import jsonschema

    def pattern(validator, regex, instance, schema):
        if validator.is_type(instance, "string") and not re.search(_ecma_end(regex), instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {regex!r}")

    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": pattern})
    schema = json.loads(resources.files("adapterkit").joinpath("schema/manifest.schema.json").read_text())
    return strict(schema)


@functools.cache
def _ecma_end(regex: str) -> str:
    return re.sub(r"(?<!\\)\$", r"\\Z", regex)


def check_manifest_json(data: object) -> None:
    """Raise FormatError naming the first place where ``data`` breaks the manifest schema."""
    import jsonschema

    if not isinstance(data, dict):
        raise FormatError("manifest is not a JSON object")
    components = data.get("components")
    if isinstance(components, list):
        _check_unique_names(components)
    error = jsonschema.exceptions.best_match(manifest_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise FormatError(f"manifest at {where}: {error.message}")


def _check_unique_names(components: list) -> None:
    seen: set[str] = set()
    for component in components:
        if not isinstance(component, dict):
            continue
        name = component.get("name")
        if not isinstance(name, str):
            continue  # the schema names the problem
        if name in seen:
            raise FormatError(f"two components are named {name!r}")
        seen.add(name)
        targets = component.get("targets")
        if isinstance(targets, list):
            duplicated = sorted({t for t in targets if isinstance(t, str) and targets.count(t) > 1})
            if duplicated:
                raise FormatError(f"component {name!r} names target {duplicated[0]!r} twice")


def check_adapter(manifest: Manifest, tensors: Mapping[str, np.ndarray]) -> None:
    """Raise FormatError (without a path; the caller adds it) if ``tensors`` disagree with ``manifest``."""
    check_manifest_json(json.loads(manifest.dumps()))
    grouped: dict[str, dict[str, dict[str, np.ndarray]]] = {c.name: {} for c in manifest.components}
    components = {c.name: c for c in manifest.components}
    for component in manifest.components:
        kind = get_kind(component.kind)
        if not kind.weighted and component.weight != 1:
            raise FormatError(f"component {component.name!r} is a {kind.name} with weight {component.weight:g}: "
                              f"a {kind.name} component cannot be weighted ({kind.unweighted_reason})")
    for name, tensor in tensors.items():
        component_name, target, role = split_tensor_name(name)
        component = components.get(component_name)
        if component is None:
            raise FormatError(f"tensor {name!r} belongs to no component of the manifest")
        if target not in component.targets:
            raise FormatError(f"tensor {name!r}: target {target!r} is not among component {component_name!r}'s targets")
        kind = get_kind(component.kind)
        if kind.roles is not None and role not in kind.roles:
            raise FormatError(f"tensor {name!r}: a {kind.name} target holds {', '.join(kind.roles)}, not {role!r}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise FormatError(f"tensor {name!r} has dtype {tensor.dtype}, adapter tensors must be F16, BF16, F32 or F64")
        if tensor.size == 0:
            raise FormatError(f"tensor {name!r} has no elements (shape {list(tensor.shape)})")
        if not all_finite(tensor):
            raise FormatError(f"tensor {name!r} contains NaN or Inf")
        grouped[component_name].setdefault(target, {})[role] = tensor
    _check_replaced_once(manifest, grouped)
    for component in manifest.components:
        kind = get_kind(component.kind)
        held = grouped[component.name]
        for target in component.targets:
            present = held.get(target, {})
            missing = [r for r in (kind.roles or ()) if r not in present]
            if missing or not present:
                what = ", ".join(missing) if missing else "any tensor"
                raise FormatError(f"component {component.name!r}, target {target!r}: missing {what}")
        kind.check(component, held)


def _check_replaced_once(manifest: Manifest, grouped: Mapping[str, Mapping[str, Mapping]]) -> None:
    """Two components of a kind that replaces base tensors must not replace the same one (which would win?)."""
    owner: dict[str, str] = {}
    for component in manifest.components:
        if not get_kind(component.kind).replaces:
            continue
        for target, roles in grouped[component.name].items():
            for role in roles:
                replaced = f"{target}.{role}"
                if replaced in owner:
                    raise FormatError(
                        f"components {owner[replaced]!r} and {component.name!r} both replace {replaced!r}")
                owner[replaced] = component.name
