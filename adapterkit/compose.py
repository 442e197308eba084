"""Compose several adapters for one base model into one adapter file.

Inputs are combined kind by kind, each input i with its weight wᵢ (times each component's own weight):

- **LoRA** components of all inputs become one LoRA component. Per target (the union of all targets) the update is
  Σ wᵢ sᵢ Bᵢ Aᵢ. ``concat`` stores it exactly (rank Σ rᵢ); ``svd`` compresses it to ``rank`` (or to the smallest rank
  meeting ``tol``) from the factors alone; ``ties`` and ``dare`` merge the dense deltas wᵢ sᵢ Bᵢ Aᵢ as their papers
  define them (not the factors, as PEFT's non-``_svd`` variants do) and re-factorise by SVD. The output uses
  ``scaling: standard`` with alpha = rank, so s = 1 and the weights and scales are folded into B.
  The math is in :mod:`adapterkit.compose_lora`.
- **BitFit** deltas add: Δb = Σ wᵢ Δbᵢ over the union of targets.
- **Prefixes** concatenate along the virtual-token axis (p = Σ pᵢ); they must cover the same attention modules. A
  prefix cannot be weighted (its keys enter a softmax, so no scale of its tensors is "w times its effect"): its
  weight must be 1.
- **Full** tensors (task heads) are copied; two inputs may bring the same tensor only if it is identical, and a
  weight other than 1 is refused (a replaced tensor has no weighted effect).

All inputs must share the base fingerprint (or have none). The manifest's ``composition`` records the method, the
sources (name, sha256, weight), the rank or tolerance and the Frobenius error of the low-rank step.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from adapterkit import compose_lora
from adapterkit.adapter import Adapter, tensor_name
from adapterkit.errors import AdapterError
from adapterkit.kinds.lora import scale
from adapterkit.manifest import COMPONENT_NAME, BaseModel, Component, Manifest

log = logging.getLogger(__name__)

METHODS = ("concat", "svd", "ties", "dare")
KIND_ORDER = ("lora", "bitfit", "prefix", "full")


@dataclass
class Part:
    """One component of one input, with the weight it enters the composite with."""

    source: str  #: the input's name, for messages
    component: Component
    tensors: dict[str, dict[str, torch.Tensor]]  #: {target: {role: tensor}}
    weight: float  #: the input's weight times the component's weight

    @property
    def where(self) -> str:
        return f"{self.source} (component {self.component.name!r})"


def compose(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    method: str = "concat",
    rank: int | None = None,
    tol: float | None = None,
    density: float | None = None,
    seed: int = 0,
    sources: Sequence[Mapping[str, str]] | None = None,
    name: str = "composed",
) -> Adapter:
    """One adapter combining ``adapters`` with ``weights`` (default 1 each) by ``method`` (see the module docstring).

    ``rank`` / ``tol`` set the rank of ``svd``, ``ties`` and ``dare`` (default: the largest input rank); ``density``
    is the kept fraction for ``ties`` and ``dare``, ``seed`` seeds DARE's random drops. ``sources`` gives each input's
    ``name`` and ``sha256`` for the manifest (default: ``adapter<i>`` and a hash of its manifest and tensors).
    ``name`` names the output component (``<name>_<kind>`` when the composite holds several kinds).
    """
    weights = _check_request(adapters, weights, method, rank, tol, density, name)
    sources = [dict(s) for s in sources] if sources is not None else [
        {"name": f"adapter{i}", "sha256": a.content_sha256()} for i, a in enumerate(adapters)
    ]
    if len(sources) != len(adapters):
        raise AdapterError(f"got {len(sources)} sources for {len(adapters)} adapters")
    base_model = _shared_base(adapters, [s["name"] for s in sources])

    parts: dict[str, list[Part]] = {}
    for adapter, source, weight in zip(adapters, sources, weights):
        for component in adapter.components:
            if component.kind not in KIND_ORDER:
                raise AdapterError(f"{source['name']}: cannot compose components of kind {component.kind!r}")
            part = Part(source["name"], component, adapter.component_tensors(component.name), weight * component.weight)
            parts.setdefault(component.kind, []).append(part)

    if method != "concat" and rank is None and tol is None and "lora" in parts:
        rank = _largest_rank(parts["lora"])  # PEFT's default for svd_rank too
    components, tensors, error = [], {}, None
    for kind in (k for k in KIND_ORDER if k in parts):
        component_name = name if len(parts) == 1 else f"{name}_{kind}"
        if kind == "lora":
            component, held, error = _compose_lora(parts[kind], component_name, method, rank, tol, density, seed)
        else:
            component, held = {"bitfit": _add_biases, "prefix": _concatenate_prefixes, "full": _join_full}[kind](
                parts[kind], component_name
            )
        components.append(component)
        tensors.update({tensor_name(component_name, t, role): x for t, roles in held.items() for role, x in roles.items()})

    composition = {
        "method": method,
        "sources": [{"name": s["name"], "sha256": s["sha256"], "weight": w} for s, w in zip(sources, weights)],
        "rank": rank,
        "tolerance": tol,
        "error": error,
    }
    if method in ("ties", "dare"):
        composition["density"] = density
    if method == "dare":
        composition["seed"] = seed
    adapter = Adapter(Manifest(components, base_model=base_model, composition=composition), tensors)
    adapter.validate()
    log.info("composed %d adapters by %s into %s (relative error %s)", len(adapters), method,
             ", ".join(f"{c.name} ({c.kind})" for c in components), error and f"{error['relative']:.3e}")
    return adapter


def _check_request(adapters, weights, method, rank, tol, density, name) -> list[float]:
    if not adapters:
        raise AdapterError("nothing to compose: give at least one adapter")
    if method not in METHODS:
        raise AdapterError(f"unknown composition method {method!r} (known: {', '.join(METHODS)})")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise AdapterError(f"got {len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"weights must be finite numbers, got {weights}")
    if method == "concat" and (rank is not None or tol is not None):
        raise AdapterError("concat is exact and keeps rank Σ rᵢ: --rank/--tol need --method svd, ties or dare")
    if rank is not None and tol is not None:
        raise AdapterError("give either a rank or a tolerance, not both")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if tol is not None and not 0 <= tol < 1:
        raise AdapterError(f"tolerance is a relative Frobenius error in [0, 1), got {tol}")
    if method in ("ties", "dare"):
        if density is None:
            raise AdapterError(f"{method} needs a density: the fraction of each delta's entries to keep, in (0, 1]")
        if not 0 < density <= 1:
            raise AdapterError(f"density is the fraction of entries to keep, in (0, 1], got {density}")
    elif density is not None:
        raise AdapterError(f"density applies to ties and dare, not to {method}")
    if not COMPONENT_NAME.match(f"{name}_bitfit"):
        raise AdapterError(f"component name {name!r} must be lower-case letters, digits and _ (at most 57 characters)")
    return weights


def _shared_base(adapters: Sequence[Adapter], names: Sequence[str]) -> BaseModel:
    """The base model of the inputs that name one; refuses inputs made for different bases."""
    first = None
    for adapter, name in zip(adapters, names):
        base = adapter.manifest.base_model
        if not base.fingerprint:
            continue
        if first is None:
            first = (base, name)
        elif base.fingerprint != first[0].fingerprint:
            raise AdapterError(
                f"{name} was made for another base model than {first[1]} "
                f"(fingerprint {base.fingerprint[:16]}… vs {first[0].fingerprint[:16]}…): refusing to compose them"
            )
    chosen = first[0] if first else adapters[0].manifest.base_model
    return copy.deepcopy(chosen)


def _largest_rank(parts: Sequence[Part]) -> int:
    return max(int(roles["lora_A"].shape[0]) for part in parts for roles in part.tensors.values())


def _lora_terms(parts: Sequence[Part]) -> dict[str, tuple[list[compose_lora.Term], bool]]:
    """Per target (in first-seen order): its ``(A, B, wᵢ·sᵢ)`` terms and its fan_in_fan_out layout."""
    by_target: dict[str, list[tuple[Part, torch.Tensor, torch.Tensor, float, bool]]] = {}
    for part in parts:
        component = part.component
        for target in component.targets:
            a, b = part.tensors[target]["lora_A"], part.tensors[target]["lora_B"]
            s = scale(a.shape[0], component.param(target, "alpha"), component.param(target, "scaling", "standard"))
            fan_in_fan_out = bool(component.param(target, "fan_in_fan_out", False))
            by_target.setdefault(target, []).append((part, a, b, part.weight * s, fan_in_fan_out))
    terms = {}
    for target, entries in by_target.items():
        first, a0, b0, _, layout = entries[0]
        for part, a, b, _, fan_in_fan_out in entries[1:]:
            if fan_in_fan_out != layout:
                raise AdapterError(
                    f"target {target!r}: {first.where} has fan_in_fan_out={layout} but {part.where} has "
                    f"{fan_in_fan_out}: refusing to mix weight layouts"
                )
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise AdapterError(
                    f"target {target!r}: shapes disagree, {first.where} updates [{b0.shape[0]}, {a0.shape[1]}] "
                    f"but {part.where} updates [{b.shape[0]}, {a.shape[1]}]"
                )
        terms[target] = ([(a, b, c) for _, a, b, c, _ in entries], layout)
    return terms


def _compose_lora(parts, component_name, method, rank, tol, density, seed):
    """The one LoRA component of the composite, its tensors, and the error of the low-rank step."""
    generator = torch.Generator().manual_seed(seed)  # DARE's drops, drawn target after target
    held, ranks, layouts, per_target, norms = {}, {}, {}, {}, {}
    for target, (terms, layout) in tqdm(_lora_terms(parts).items(), desc=f"compose ({method})", unit="target",
                                        disable=None):
        if method == "concat":
            a, b = compose_lora.concatenate(terms)
        else:
            low = _low_rank(method, terms, rank, tol, density, generator)
            a, b = low.a, low.b
            per_target[target] = {"absolute": low.absolute_error, "relative": low.relative_error, "rank": low.rank}
            norms[target] = low.norm
        held[target] = {"lora_A": a.to(torch.float32).contiguous(), "lora_B": b.to(torch.float32).contiguous()}
        ranks[target], layouts[target] = int(a.shape[0]), layout
    component = Component(component_name, "lora", list(held), *_lora_params(ranks, layouts))
    return component, held, _overall_error(per_target, norms)


def _low_rank(method, terms, rank, tol, density, generator) -> compose_lora.LowRank:
    if method == "svd":
        return compose_lora.compress_factors(*compose_lora.concatenate(terms), rank=rank, tol=tol)
    deltas = compose_lora.dense_deltas(terms)
    merged = (compose_lora.ties_delta(deltas, density) if method == "ties"
              else compose_lora.dare_delta(deltas, density, generator))
    return compose_lora.compress_dense(merged, rank=rank, tol=tol)


def _lora_params(ranks: dict[str, int], layouts: dict[str, bool]) -> tuple[dict, dict]:
    """Component params from the most common rank and layout; targets that differ get ``target_params``."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    layout = Counter(layouts.values()).most_common(1)[0][0]
    params = {"rank": rank, "alpha": rank, "scaling": "standard", "fan_in_fan_out": layout}
    target_params = {}
    for target in ranks:
        override = {}
        if ranks[target] != rank:
            override.update(rank=ranks[target], alpha=ranks[target])  # alpha = rank: s = 1
        if layouts[target] != layout:
            override["fan_in_fan_out"] = layouts[target]
        if override:
            target_params[target] = override
    return params, target_params


def _overall_error(per_target: dict[str, dict], norms: dict[str, float]) -> dict:
    """Overall absolute error √Σₜ errorₜ² and relative error against √Σₜ‖ΔWₜ‖²_F (both 0 for the exact concat)."""
    absolute = math.sqrt(sum(e["absolute"] ** 2 for e in per_target.values()))
    norm = math.sqrt(sum(n**2 for n in norms.values()))
    out = {"relative": absolute / norm if norm > 0 else 0.0, "absolute": absolute}
    if per_target:
        out["per_target"] = per_target
    return out


def _add_biases(parts: Sequence[Part], component_name: str):
    held: dict[str, dict[str, torch.Tensor]] = {}
    owner: dict[str, Part] = {}
    for part in parts:
        for target in part.component.targets:
            bias = part.tensors[target]["bias"].to(torch.float32) * part.weight
            if target not in held:
                held[target], owner[target] = {"bias": bias}, part
            elif held[target]["bias"].shape != bias.shape:
                raise AdapterError(
                    f"target {target!r}: shapes disagree, {owner[target].where} has bias {list(held[target]['bias'].shape)}"
                    f" but {part.where} has {list(bias.shape)}"
                )
            else:
                held[target]["bias"] = held[target]["bias"] + bias
    return Component(component_name, "bitfit", list(held), {}), held


def _concatenate_prefixes(parts: Sequence[Part], component_name: str):
    first = parts[0]
    for part in parts:
        if part.weight != 1:
            raise AdapterError(
                f"{part.where} is a prefix with weight {part.weight:g}: a prefix cannot be weighted (its keys enter "
                "the attention softmax); give its input weight 1"
            )
        if set(part.component.targets) != set(first.component.targets):
            raise AdapterError(
                f"prefixes of {first.where} and {part.where} cover different attention modules: "
                "they can only be concatenated over the same targets"
            )
    held = {}
    for target in first.component.targets:
        keys = [part.tensors[target]["prefix_key"] for part in parts]
        shapes = {(k.shape[0], k.shape[2]) for k in keys}
        if len(shapes) > 1:
            raise AdapterError(f"target {target!r}: shapes disagree, prefixes have [kv_heads, head_dim] {sorted(shapes)}")
        held[target] = {role: torch.cat([part.tensors[target][role] for part in parts], dim=1)
                        for role in ("prefix_key", "prefix_value")}
    length = sum(int(part.component.params["prefix_length"]) for part in parts)
    return Component(component_name, "prefix", list(held), {**first.component.params, "prefix_length": length}), held


def _join_full(parts: Sequence[Part], component_name: str):
    held: dict[str, dict[str, torch.Tensor]] = {}
    owner: dict[tuple[str, str], Part] = {}
    params: dict = {}
    for part in parts:
        if part.weight != 1:
            raise AdapterError(
                f"{part.where} holds full tensors with weight {part.weight:g}: a replaced tensor cannot be weighted; "
                "give its input weight 1"
            )
        params.update(part.component.params)
        for target in part.component.targets:
            for parameter, tensor in part.tensors[target].items():
                known = held.setdefault(target, {}).get(parameter)
                if known is not None and not (known.shape == tensor.shape and torch.equal(known, tensor)):
                    raise AdapterError(
                        f"{owner[target, parameter].where} and {part.where} bring different {target}.{parameter} "
                        "tensors: refusing to pick one"
                    )
                held[target][parameter], owner[target, parameter] = tensor, part
    return Component(component_name, "full", list(held), params), held
