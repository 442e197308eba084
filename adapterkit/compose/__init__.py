"""Compose several adapters for one base model into one adapter file.

Inputs are combined kind by kind, each input i with its weight wᵢ (times each component's own weight): all the
components of one kind, across the inputs, become one component of the composite, by that kind's rule
(:meth:`adapterkit.kinds.base.Kind.compose`):

- **LoRA**: per target (the union of all targets) the update Σ wᵢ sᵢ Bᵢ Aᵢ, by a method of
  :mod:`adapterkit.compose.methods` (``concat`` exact; ``svd``, ``ties``, ``dare`` compressed to ``rank`` or ``tol``).
- **BitFit** deltas add: Δb = Σ wᵢ Δbᵢ over the union of targets.
- **Prefixes** concatenate along the virtual-token axis (p = Σ pᵢ) over the same attention modules, weight 1 only.
- **Full** tensors (task heads) are kept once; two inputs may bring the same tensor only if it is identical.

All inputs must share the base fingerprint (or have none). The manifest's ``composition`` records the method, the
sources (name, sha256, weight), the rank or tolerance and the Frobenius error of the low-rank step. Pure numpy: no
deep-learning framework is imported. The independent pieces (each target's LoRA math, each input's digest) run on
``threads`` threads, numpy's BLAS on one thread each meanwhile (:mod:`adapterkit.compose.parallel`).
"""

from __future__ import annotations

import copy
import logging
from typing import Mapping, Sequence

import numpy as np

from adapterkit.adapter import Adapter, split_tensor_name, tensor_name
from adapterkit.errors import BaseMismatchError, FormatError, RequestError
from adapterkit.kinds import KINDS, get_kind
from adapterkit.kinds.base import CompositionRequest, Part
from adapterkit.manifest import COMPONENT_NAME, BaseModel, Manifest
from adapterkit.compose import parallel
from adapterkit.compose.methods import METHODS, get_method
from adapterkit.values import check_weights, count, number

log = logging.getLogger(__name__)

__all__ = ["METHODS", "compose"]


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
    threads: int | None = None,
    normalise: str | None = None,
) -> Adapter:
    """One adapter combining ``adapters`` with ``weights`` (default 1 each) by ``method`` (see the module docstring).

    ``rank`` / ``tol`` set the rank of ``svd``, ``ties`` and ``dare`` (default: the largest input rank); ``density``
    is the kept fraction for ``ties`` and ``dare``, ``seed`` seeds DARE's random drops, ``normalise`` is what TIES
    divides the agreeing sum by (``count``, the paper's and the default; ``weights``, mergekit's; ``none``, mergekit's
    ``dare_ties``: see :mod:`adapterkit.compose.methods`). ``sources`` gives each input's
    ``name`` and ``sha256`` for the manifest (default: ``adapter<i>`` and a hash of its manifest and tensors).
    ``name`` names the output component (``<name>_<kind>`` when the composite holds several kinds). ``threads``: how
    many threads to run on (default: the CPUs available; 1: the calling thread alone).
    """
    if not adapters:
        raise RequestError("nothing to compose: give at least one adapter")
    weights = check_weights(weights, len(adapters))
    method = get_method(method)
    request = _request(method, rank, tol, density, seed, normalise)
    if not COMPONENT_NAME.match(f"{name}_bitfit"):
        raise RequestError(f"component name {name!r} must be lower-case letters, digits and _ (at most 57 characters)")
    if sources is not None:
        sources = [dict(s) for s in sources]
        if len(sources) != len(adapters):
            raise RequestError(f"got {len(sources)} sources for {len(adapters)} adapters")
    if threads is not None:
        threads = count(threads, "threads")
    with parallel.workers(threads):
        if sources is None:  # the digests run while the LoRA math does
            digests = [parallel.submit(a.content_sha256) for a in adapters]
            names = [f"adapter{i}" for i in range(len(adapters))]
        else:
            names = [s["name"] for s in sources]
        base_model = _shared_base(adapters, names)

        parts: dict[str, list[Part]] = {}
        for adapter, source_name, weight in zip(adapters, names, weights):
            grouped = _component_tensors(adapter)
            for component in adapter.components:
                get_kind(component.kind)  # an unknown kind is refused by name
                part = Part(source_name, component, grouped[component.name], weight * component.weight)
                parts.setdefault(component.kind, []).append(part)

        if not method.exact and request.rank is None and request.tol is None:
            request.rank = _largest_rank(parts)  # PEFT's default for svd_rank too
        components, tensors, error = [], {}, None
        for kind_name in (k for k in KINDS if k in parts):
            component_name = name if len(parts) == 1 else f"{name}_{kind_name}"
            composed = KINDS[kind_name].compose(parts[kind_name], request, component_name)
            components.append(composed.component)
            error = composed.error if composed.error is not None else error
            tensors.update({tensor_name(component_name, t, role): x for t, roles in composed.tensors.items()
                            for role, x in roles.items()})
        if sources is None:
            sources = [{"name": n, "sha256": digest()} for n, digest in zip(names, digests)]

    composition = {
        "method": method.name,
        "sources": [{"name": s["name"], "sha256": s["sha256"], "weight": w} for s, w in zip(sources, weights)],
        "rank": request.rank,
        "tolerance": request.tol,
        "error": error,
    }
    for option in ("density", "seed", "normalise"):
        if option in method.options:
            composition[option] = getattr(request, option)
    adapter = Adapter(Manifest(components, base_model=base_model, composition=composition), tensors)
    try:
        adapter.validate()
    except FormatError as exc:  # finite inputs whose weights overflow float32 in the result
        raise RequestError(f"the composite would not be a valid file: {exc.reason} (weights or alphas too "
                           "large?); nothing was written") from None
    log.info("composed %d adapters by %s into %s (relative error %s)", len(adapters), method.name,
             ", ".join(f"{c.name} ({c.kind})" for c in components), error and f"{error['relative']:.3e}")
    return adapter


def _request(method, rank, tol, density, seed, normalise=None) -> CompositionRequest:
    """The options of a composition, each checked, for ``method``."""
    given = {"rank": rank, "tol": tol, "density": density, "normalise": normalise}
    flags = {"normalise": "ties-normalise"}
    for option, value in given.items():
        if value is not None and option not in method.options:
            users = [m.name for m in METHODS.values() if option in m.options]
            raise RequestError(f"--{flags.get(option, option)} does not apply to {method.name}"
                               + (" (it is exact and keeps rank Σ rᵢ)" if method.exact else "")
                               + f": it needs --method {' or '.join(users)}")
    for option in method.required:
        if given[option] is None:
            raise RequestError(f"{method.name} needs --{option}")
    if rank is not None and tol is not None:
        raise RequestError("give either a rank or a tolerance, not both")
    return CompositionRequest(
        method=method.name,
        rank=None if rank is None else count(rank, "rank"),
        tol=None if tol is None else number(tol, "tolerance (a relative Frobenius error)", 0, 1, high_open=True),
        density=None if density is None else number(density, "density (the fraction of entries to keep)", 0, 1,
                                                    low_open=True),
        seed=count(seed, "seed", low=0),
        normalise=_normalisation(normalise),
    )


def _component_tensors(adapter: Adapter) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{component: adapter.component_tensors(component)}`` for all of the adapter's components, in one pass over its
    tensors."""
    grouped: dict[str, dict[str, dict[str, np.ndarray]]] = {c.name: {} for c in adapter.components}
    for key, tensor in adapter.tensors.items():
        component, target, role = split_tensor_name(key)
        if component in grouped:
            grouped[component].setdefault(target, {})[role] = tensor
    return grouped


def _normalisation(normalise: str | None) -> str:
    from adapterkit.compose.methods import TIES_NORMALISATIONS

    if normalise is None:
        return "count"
    if normalise not in TIES_NORMALISATIONS:
        raise RequestError(f"unknown TIES normalisation {normalise!r} (known: {', '.join(TIES_NORMALISATIONS)})")
    return normalise


def _shared_base(adapters: Sequence[Adapter], names: Sequence[str]) -> BaseModel:
    """The base model of the inputs that name one; refuses inputs made for different bases (compared by every
    fingerprint algorithm both record)."""
    first = None
    for adapter, name in zip(adapters, names):
        recorded = adapter.manifest.base_model.recorded()
        if not recorded:
            continue
        if first is None:
            first = (adapter.manifest.base_model, name, recorded)
            continue
        common = sorted(set(recorded) & set(first[2]))
        differing = [a for a in common if recorded[a] != first[2][a]]
        if differing:
            a = differing[0]
            raise BaseMismatchError(
                f"{name} was made for another base model than {first[1]} "
                f"(fingerprint {recorded[a][:16]}… vs {first[2][a][:16]}…): refusing to compose them"
            )
    chosen = first[0] if first else adapters[0].manifest.base_model
    return copy.deepcopy(chosen)


def _largest_rank(parts: Mapping[str, Sequence[Part]]) -> int | None:
    """The largest rank of any input target (of any kind with ranks), or None when none has one."""
    ranks = [int(roles["lora_A"].shape[0]) for kind_parts in parts.values() for part in kind_parts
             for roles in part.tensors.values() if "lora_A" in roles]
    return max(ranks) if ranks else None
