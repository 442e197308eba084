"""The manifest: what an adapter file holds, for which base model, and how it was made.

The manifest is JSON stored in the safetensors metadata under ``adapterkit.manifest`` (see ``spec/SPEC.md``). These
dataclasses are its in-memory form. Fields this version does not know (written by a newer minor version) are kept in
``extra`` and written back unchanged.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = "1.1"
SUPPORTED_MAJOR = 1
COMPONENT_NAME = re.compile(r"[a-z0-9_]{1,64}\Z")


def parse_version(text: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; raises ValueError for anything else."""
    match = re.fullmatch(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})", text)
    if not match:
        raise ValueError(f"format version {text!r} is not of the form MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2))


def _split_known(data: dict, known: tuple[str, ...]) -> tuple[dict, dict]:
    known_part = {k: v for k, v in data.items() if k in known}
    extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in known}
    return known_part, extra


@dataclass
class BaseModel:
    """The base model an adapter belongs to."""

    id: str | None = None
    revision: str | None = None
    #: ``fp1`` (what 1.0 readers check), spec §7
    fingerprint: str | None = None
    #: more fingerprints by algorithm (1.1: ``{"fp2": ...}``, head-free); readers use the best one they know
    fingerprints: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("id", "revision", "fingerprint", "fingerprints")

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("id", "revision", "fingerprint")}
        if self.fingerprints:
            out["fingerprints"] = dict(self.fingerprints)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "BaseModel":
        known, extra = _split_known(data, cls.FIELDS)
        known["fingerprints"] = dict(known.get("fingerprints") or {})
        return cls(**known, extra=extra)

    def recorded(self) -> dict[str, str]:
        """Every fingerprint recorded, by algorithm."""
        out = {value.partition(":")[0]: value for value in self.fingerprints.values()}
        if self.fingerprint:
            out.setdefault(self.fingerprint.partition(":")[0], self.fingerprint)
        return out


@dataclass
class Component:
    """One adapter inside a file: a kind (lora, bitfit, prefix, full), the base modules it targets, its parameters.

    ``params`` are the kind's hyper-parameters (for LoRA: rank, alpha, scaling, fan_in_fan_out); ``target_params``
    override them per target (PEFT's rank_pattern / alpha_pattern). ``weight`` multiplies the component's effect.
    """

    name: str
    kind: str
    targets: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    target_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    weight: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("name", "kind", "targets", "params", "target_params", "weight")

    def param(self, target: str, key: str, default: Any = None) -> Any:
        """A hyper-parameter for one target: its override if it has one, else the component's value."""
        override = self.target_params.get(target, {})
        if key in override:
            return override[key]
        return self.params.get(key, default)

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "kind": self.kind,
            "targets": list(self.targets),
            "params": copy.deepcopy(self.params),
            "weight": self.weight,
        }
        if self.target_params:
            out["target_params"] = copy.deepcopy(self.target_params)
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Component":
        known, extra = _split_known(data, cls.FIELDS)
        known.setdefault("params", {})
        known.setdefault("target_params", {})
        known.setdefault("weight", 1.0)
        known["weight"] = float(known["weight"])
        return cls(**copy.deepcopy(known), extra=extra)


@dataclass
class Manifest:
    """Everything in an adapter file but the tensors."""

    components: list[Component]
    base_model: BaseModel = field(default_factory=BaseModel)
    producer: dict[str, Any] = field(default_factory=lambda: {"name": "adapterkit", "version": _our_version()})
    composition: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    format_version: str = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("components", "base_model", "producer", "composition", "training")

    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(name)

    @property
    def kinds(self) -> list[str]:
        return sorted({c.kind for c in self.components})

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "producer": copy.deepcopy(self.producer),
            "base_model": self.base_model.to_json(),
            "components": [c.to_json() for c in self.components],
        }
        if self.composition is not None:
            out["composition"] = copy.deepcopy(self.composition)
        if self.training is not None:
            out["training"] = copy.deepcopy(self.training)
        out.update(copy.deepcopy(self.extra))
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: dict, format_version: str = FORMAT_VERSION) -> "Manifest":
        known, extra = _split_known(data, cls.FIELDS)
        return cls(
            components=[Component.from_json(c) for c in known["components"]],
            base_model=BaseModel.from_json(known.get("base_model") or {}),
            producer=copy.deepcopy(known.get("producer") or {}),
            composition=copy.deepcopy(known.get("composition")),
            training=copy.deepcopy(known.get("training")),
            format_version=format_version,
            extra=extra,
        )

    def written_version(self) -> str:
        """The version to write: ours, or the file's own if it came from a newer minor (its fields are kept)."""
        ours = parse_version(FORMAT_VERSION)
        theirs = parse_version(self.format_version)
        return self.format_version if theirs > ours else FORMAT_VERSION


def _our_version() -> str:
    from adapterkit import __version__

    return __version__
