"""A summary of an adapter for people and programs: what ``adapterkit inspect`` shows, and the Hub model card."""

from __future__ import annotations

import hashlib
import json
import os

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError
from adapterkit.kinds import get_kind


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(adapter: Adapter, path: str | os.PathLike | None = None) -> dict:
    """A JSON-ready description of ``adapter`` (and of its file, when ``path`` is given)."""
    manifest = adapter.manifest
    components = []
    for component in manifest.components:
        tensors = adapter.component_tensors(component.name)
        entry = {
            "name": component.name,
            "kind": component.kind,
            "weight": component.weight,
            "targets": len(component.targets),
            "target_names": list(component.targets),
            "parameters": get_kind(component.kind).parameter_count(component, tensors),
            "params": dict(component.params),
        }
        if component.kind == "lora":
            entry["ranks"] = sorted({int(roles["lora_A"].shape[0]) for roles in tensors.values()})
        if component.kind == "prefix":
            entry["prefix_length"] = component.params.get("prefix_length")
        components.append(entry)
    out = {
        "format_version": manifest.format_version,
        "producer": manifest.producer,
        "base_model": manifest.base_model.to_json(),
        "kinds": manifest.kinds,
        "components": components,
        "parameters": adapter.parameter_count(),
        "tensor_bytes": adapter.nbytes(),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values()}),
    }
    if manifest.composition:
        out["composition"] = manifest.composition
    if manifest.training:
        out["training"] = manifest.training
    if path is not None:
        out["file"] = os.fspath(path)
        out["file_bytes"] = os.path.getsize(path)
        out["sha256"] = sha256_of(path)
    return out


def _compact_targets(names: list[str]) -> str:
    """``model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj (x2)``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(".".join(p if not p.isdigit() else "*" for p in name.split(".")), []).append(name)
    return ", ".join(f"{s} (x{len(members)})" if len(members) > 1 else members[0] for s, members in groups.items())


def render(summary: dict) -> str:
    """The human-readable form of :func:`describe`."""
    base = summary["base_model"]
    lines = []
    if "file" in summary:
        lines.append(f"{summary['file']}  ({summary['file_bytes']:,} bytes, sha256 {summary['sha256'][:16]}…)")
    lines += [
        f"format      adapterkit {summary['format_version']} (written by {summary['producer'].get('name', '?')} "
        f"{summary['producer'].get('version', '')})".rstrip(),
        f"base model  {base.get('id') or '(unnamed)'}" + (f" @ {base['revision']}" if base.get("revision") else ""),
        f"fingerprint {base.get('fingerprint') or '(none)'}",
        f"kinds       {', '.join(summary['kinds'])}",
        f"parameters  {summary['parameters']:,} in {summary['tensor_bytes']:,} bytes ({', '.join(summary['dtypes'])})",
        "components:",
    ]
    for c in summary["components"]:
        detail = f"weight {c['weight']:g}, {c['targets']} targets, {c['parameters']:,} parameters"
        if "ranks" in c:
            detail += f", rank {'/'.join(map(str, c['ranks']))}, alpha {c['params'].get('alpha')}"
            if c["params"].get("scaling", "standard") != "standard":
                detail += f" ({c['params']['scaling']})"
        if c.get("prefix_length"):
            detail += f", prefix length {c['prefix_length']}"
        lines.append(f"  {c['name']:<12} {c['kind']:<7} {detail}")
        lines.append(f"  {'':<12} {'':<7} targets: {_compact_targets(c['target_names'])}")
    composition = summary.get("composition")
    if composition:
        lines.append(f"composed    {_composition_line(composition)}")
        for source in composition["sources"]:
            lines.append(f"  from {source['name']} (weight {source['weight']:g}, sha256 {source['sha256'][:16]}…)")
        error = composition.get("error") or {}
        if isinstance(error.get("relative"), (int, float)) and error["relative"] > 0:
            worst = max((e.get("relative", 0) for e in (error.get("per_target") or {}).values()
                         if isinstance(e, dict) and isinstance(e.get("relative"), (int, float))), default=None)
            lines.append(f"  relative Frobenius error {error['relative']:.3e} overall"
                         + (f", {worst:.3e} at worst per target" if worst is not None else ""))
    training = summary.get("training")
    if training:
        shown = ", ".join(f"{k}={v}" for k, v in training.items() if not isinstance(v, (dict, list)))
        lines.append(f"trained     {shown}")
    return "\n".join(lines)


def _composition_line(composition: dict) -> str:
    """``by svd to rank 16``, ``by svd to tolerance 0.05``, ``by ties (density 0.2) to rank 8``, ``by concat (exact)``."""
    method = composition.get("method", "?")
    details = [f"{key} {composition[key]}" for key in ("density", "seed") if composition.get(key) is not None]
    error = composition.get("error") or {}
    if method == "concat" or error.get("relative") == 0:
        details.append("exact")
    line = f"by {method}" + (f" ({', '.join(details)})" if details else "")
    if composition.get("rank"):
        line += f" to rank {composition['rank']}"
    elif composition.get("tolerance") is not None:
        line += f" to tolerance {composition['tolerance']}"
    return line


MERGE_RECORD = "adapterkit_merge.json"  # written by adapterkit.merge_checkpoint
EXPORT_DESCRIPTION = "adapterkit.json"  # written by adapterkit.onnx.export


def describe_folder(folder: str | os.PathLike) -> dict:
    """What adapterkit wrote into a folder: a merged model (its merge record) or an ONNX export (its description)."""
    folder = os.fspath(folder)
    for name, what in ((MERGE_RECORD, "merged model"), (EXPORT_DESCRIPTION, "onnx export")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path) as handle:
                    record = json.load(handle)
            except (OSError, ValueError) as exc:
                raise AdapterError(f"{name} is unreadable ({exc})", folder) from None
            return {"folder": folder, "what": what, **record}
    raise AdapterError(f"not an adapter file, merged model or ONNX export (no {MERGE_RECORD} or {EXPORT_DESCRIPTION})",
                       folder)


def render_folder(summary: dict) -> str:
    """The human-readable form of :func:`describe_folder`."""
    lines = [f"{summary['folder']}  ({summary['what']})"]
    if summary["what"] == "merged model":
        lines.append(f"base fingerprint {summary.get('base_fingerprint')}")
        for entry in summary.get("merged", []):
            lines.append(f"  merged {entry.get('source')} (weight {entry.get('weight', 1):g}, "
                         f"sha256 {str(entry.get('sha256'))[:16]}…)")
        return "\n".join(lines)
    lines.append(f"mode        {summary.get('mode')} graph {summary.get('model')} from base {summary.get('base')}")
    lines.append("inputs      " + ", ".join(f"{i['name']} {i['shape']}" for i in summary.get("inputs", [])))
    lines.append("outputs     " + ", ".join(f"{o['name']} {o['shape']}" for o in summary.get("outputs", [])))
    if summary.get("adapter_inputs"):
        lines.append(f"adapter slots {len(summary['adapter_inputs'])} optional inputs (empty by default: the base model)")
    for adapter in summary.get("adapters", []):
        lines.append(f"  adapter {adapter['name']:<12} {', '.join(adapter.get('kinds', []))}"
                     + (f"  {adapter['file']}" if adapter.get("file") else ""))
    return "\n".join(lines)
