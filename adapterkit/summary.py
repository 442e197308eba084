"""A summary of an adapter for people and programs: what ``adapterkit inspect`` shows, and the Hub model card.

Each kind adds its own fields and words (:meth:`adapterkit.kinds.base.Kind.describe` and ``detail``). Every line of
the text form is made printable (:func:`adapterkit.text.printable`): strings from a file cannot forge a line.
"""

from __future__ import annotations

import json
import os

from adapterkit.adapter import Adapter
from adapterkit.errors import FormatError
from adapterkit.io.digest import sha256_of
from adapterkit.io.paths import open_regular
from adapterkit.kinds import get_kind
from adapterkit.text import printable

MERGE_RECORD = "adapterkit_merge.json"  # written by adapterkit.merge_checkpoint
EXPORT_DESCRIPTION = "adapterkit.json"  # written by adapterkit.onnx.export


def describe(adapter: Adapter, path: str | os.PathLike | None = None) -> dict:
    """A JSON-ready description of ``adapter`` (and of its file, when ``path`` is given)."""
    manifest = adapter.manifest
    components = []
    for component in manifest.components:
        kind = get_kind(component.kind)
        tensors = adapter.component_tensors(component.name)
        components.append({
            "name": component.name,
            "kind": component.kind,
            "weight": component.weight,
            "targets": len(component.targets),
            "target_names": list(component.targets),
            "parameters": kind.parameter_count(component, tensors),
            "params": dict(component.params),
            **kind.describe(component, tensors),
        })
    out = {
        "format_version": manifest.format_version,
        "producer": manifest.producer,
        "base_model": manifest.base_model.to_json(),
        "kinds": manifest.kinds,
        "components": components,
        "parameters": adapter.parameter_count(),
        "tensor_bytes": adapter.nbytes(),
        "dtypes": sorted({str(t.dtype) for t in adapter.tensors.values()}),
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
    producer = summary["producer"]
    lines = []
    if "file" in summary:
        lines.append(f"{summary['file']}  ({summary['file_bytes']:,} bytes, sha256 {summary['sha256'][:16]}…)")
    lines += [
        f"format      adapterkit {summary['format_version']} (written by {producer.get('name', '?')} "
        f"{producer.get('version', '')})".rstrip(),
        f"base model  {base.get('id') or '(unnamed)'}" + (f" @ {base['revision']}" if base.get("revision") else ""),
        f"fingerprint {base.get('fingerprint') or '(none)'}",
        f"kinds       {', '.join(summary['kinds'])}",
        f"parameters  {summary['parameters']:,} in {summary['tensor_bytes']:,} bytes ({', '.join(summary['dtypes'])})",
        "components:",
    ]
    for c in summary["components"]:
        detail = f"weight {c['weight']:g}, {c['targets']} targets, {c['parameters']:,} parameters"
        kind_detail = get_kind(c["kind"]).detail(c)
        if kind_detail:
            detail += f", {kind_detail}"
        lines.append(f"  {c['name']:<12} {c['kind']:<7} {detail}")
        lines.append(f"  {'':<12} {'':<7} targets: {_compact_targets(c['target_names'])}")
    composition = summary.get("composition")
    if composition:
        lines.append(f"composed    {_composition_line(composition)}")
        for source in composition["sources"]:
            lines.append(f"  from {source['name']} (weight {source['weight']:g}, sha256 {source['sha256'][:16]}…)")
        error = composition.get("error") or {}
        if _is_number(error.get("relative")) and error["relative"] > 0:
            worst = max((e.get("relative", 0) for e in (error.get("per_target") or {}).values()
                         if isinstance(e, dict) and _is_number(e.get("relative"))), default=None)
            lines.append(f"  relative Frobenius error {error['relative']:.3e} overall"
                         + (f", {worst:.3e} at worst per target" if worst is not None else ""))
    training = summary.get("training")
    if training:
        shown = ", ".join(f"{k}={v}" for k, v in training.items() if not isinstance(v, (dict, list)))
        lines.append(f"trained     {shown}")
    return "\n".join(printable(line) for line in lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def describe_folder(folder: str | os.PathLike) -> dict:
    """What adapterkit wrote into a folder: a merged model (its merge record) or an ONNX export (its description)."""
    folder = os.fspath(folder)
    for name, what in ((MERGE_RECORD, "merged model"), (EXPORT_DESCRIPTION, "onnx export")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open_regular(path) as handle:
                    record = json.load(handle)
            except (OSError, ValueError) as exc:
                raise FormatError(f"{name} is unreadable ({type(exc).__name__})", folder) from None
            if not isinstance(record, dict):
                raise FormatError(f"{name} is not a JSON object", folder)
            return {"folder": folder, "what": what, **record}
    raise FormatError(f"not an adapter file, merged model or ONNX export (no {MERGE_RECORD} or {EXPORT_DESCRIPTION})",
                      folder)


def render_folder(summary: dict) -> str:
    """The human-readable form of :func:`describe_folder` (whatever the record holds: every value is shown as text)."""
    lines = [f"{summary['folder']}  ({summary['what']})"]
    if summary["what"] == "merged model":
        lines.append(f"base fingerprint {summary.get('base_fingerprint')}")
        for entry in _dicts(summary.get("merged")):
            lines.append(f"  merged {entry.get('source')} (weight {entry.get('weight', 1)}, "
                         f"sha256 {str(entry.get('sha256'))[:16]}…)")
        return "\n".join(printable(line) for line in lines)
    lines.append(f"mode        {summary.get('mode')} graph {summary.get('model')} from base {summary.get('base')}")
    lines.append("inputs      " + ", ".join(f"{i.get('name')} {i.get('shape')}" for i in _dicts(summary.get("inputs"))))
    lines.append("outputs     " + ", ".join(f"{o.get('name')} {o.get('shape')}" for o in _dicts(summary.get("outputs"))))
    slots = _dicts(summary.get("adapter_inputs"))
    if slots and isinstance(summary.get("bank"), dict):
        lines.append(f"adapter bank {len(slots)} optional inputs, stacked over the adapters (entry 0: the base "
                     f"model); {summary['bank'].get('index')} picks each row's entry")
    elif slots:
        lines.append(f"adapter slots {len(slots)} optional inputs (empty by default: the base model)")
    for adapter in _dicts(summary.get("adapters")):
        kinds = adapter.get("kinds") if isinstance(adapter.get("kinds"), list) else []
        lines.append(f"  adapter {str(adapter.get('name')):<12} {', '.join(map(str, kinds))}"
                     + (f"  {adapter['file']}" if adapter.get("file") else ""))
    return "\n".join(printable(line) for line in lines)


def _dicts(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
