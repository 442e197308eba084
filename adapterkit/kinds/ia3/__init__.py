"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638): learned vectors that rescale activations.

A target holds ``ia3_l``, a 1-D vector l. On a target whose ``feedforward`` param is false (keys, values) it rescales
the module's output, bias included: y = (W x + b) ⊙ (w·l), l of size out. On a feed-forward target (the second layer
of a feed-forward block) it rescales the module's input: y = W (x ⊙ w·l) + b, l of size in (the paper's
l_ff ⊙ γ(W₁ x), §3.3). ``w`` is the component's weight; several (IA)³ entries on one module multiply.
``fan_in_fan_out`` says the base stores the weight as [in, out] (GPT-2's Conv1D), for merging.

Composition is PEFT's weighted sum (``add_weighted_adapter``): per target, l = Σ wᵢ·vᵢ over the inputs that hold
(IA)³ components, where vᵢ is what input i multiplies that module by: its vector times its component's weight, or 1
where it leaves the module alone (an absent vector is the identity, not zero). Feed-forward and output vectors never
mix on one target.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.base import Composed, Kind, Part
from adapterkit.manifest import Component

ROLE = "ia3_l"
#: the params a component (and each of its targets) may set, all booleans, default false
FLAGS = ("feedforward", "fan_in_fan_out")


def feedforward(component: Component, target: str) -> bool:
    """Whether the target's vector scales the module's input (a feed-forward target) rather than its output."""
    return bool(component.param(target, "feedforward", False))


def fan_in_fan_out(component: Component, target: str) -> bool:
    """Whether the base stores the target's weight as [in, out] (GPT-2's Conv1D)."""
    return bool(component.param(target, "fan_in_fan_out", False))


class IA3(Kind):
    name = "ia3"
    summary = "learned vectors rescaling keys, values and feed-forward inputs"
    roles = (ROLE,)
    default_lr = 2e-2

    def check(self, component, tensors) -> None:
        for where, values in [("params", component.params), *(
                (f"target_params of {t!r}", v) for t, v in component.target_params.items())]:
            for flag in FLAGS:
                if flag in values and not isinstance(values[flag], bool):
                    raise FormatError(f"component {component.name!r}: {where}: {flag} must be true or false, "
                                      f"got {values[flag]!r}")
        for target in component.targets:
            vector = tensors[target][ROLE]
            if vector.ndim != 1:
                raise FormatError(f"component {component.name!r}, target {target!r}: ia3_l must be 1-D, "
                                  f"got {list(vector.shape)}")

    def describe(self, component, tensors) -> dict:
        return {"feedforward_targets": sum(feedforward(component, t) for t in component.targets)}

    def detail(self, entry) -> str:
        return f"{entry['feedforward_targets']} feed-forward"

    def compose(self, parts, request, name) -> Composed:
        inputs = _inputs(parts)
        held: dict[str, dict[str, np.ndarray]] = {}
        flags: dict[str, tuple[bool, bool]] = {}
        owner: dict[str, Part] = {}
        for _, effects in inputs:
            for target, (vector, target_flags, part) in effects.items():
                if target not in owner:
                    owner[target], flags[target] = part, target_flags
                    held[target] = {ROLE: np.zeros(vector.shape)}  # summed in float64
                    continue
                first = owner[target]
                if target_flags[0] != flags[target][0]:
                    raise RequestError(f"target {target!r}: {first.where} scales its {_side(flags[target][0])} but "
                                       f"{part.where} its {_side(target_flags[0])}: refusing to mix them")
                if target_flags[1] != flags[target][1]:
                    raise RequestError(f"target {target!r}: {first.where} has fan_in_fan_out={flags[target][1]} but "
                                       f"{part.where} has {target_flags[1]}: refusing to mix weight layouts")
                if vector.shape != held[target][ROLE].shape:
                    raise RequestError(f"target {target!r}: shapes disagree, {first.where} has ia3_l "
                                       f"{list(held[target][ROLE].shape)} but {part.where} has {list(vector.shape)}")
        for weight, effects in inputs:
            for target, roles in held.items():
                if target in effects:  # (an input whose components all have weight 0 brings vectors of 0 here)
                    roles[ROLE] += (weight or 0.0) * effects[target][0]
                elif weight is None:
                    raise RequestError(f"{owner[target].where} targets {target!r} but an input whose (IA)³ components "
                                       "all have weight 0 does not: its own weight, which its vector of ones there "
                                       "enters the sum with, is unknown")
                else:
                    roles[ROLE] += weight  # that input leaves the module alone: its vector is 1
        for target, roles in held.items():
            roles[ROLE] = roles[ROLE].astype(np.float32)
            if not np.isfinite(roles[ROLE]).all():
                raise RequestError(f"target {target!r}: the weighted sum of the vectors is not finite in float32")
        params, target_params = _composite_params(flags)
        return Composed(Component(name, self.name, list(held), params, target_params), held)


def common(values) -> bool:
    """The most common of some flags, false on a tie (the default)."""
    counts = Counter(values)
    return counts[True] > counts[False]


def _side(is_feedforward: bool) -> str:
    return "input (feed-forward)" if is_feedforward else "output"


def _inputs(parts: Sequence[Part]) -> list[tuple[float | None, dict]]:
    """The parts grouped by input (consecutive parts of one source, each component name once), each as
    ``(input weight, {target: (v, (feedforward, fan_in_fan_out), part)})`` where v = component weight · l, multiplied
    over the input's components that share a target (they multiply when attached). The input weight is the part's
    weight divided by its component's; None when every component of the input has weight 0."""
    groups: list[list[Part]] = []
    for part in parts:
        group = groups[-1] if groups else None
        if group is None or group[-1].source != part.source or \
                part.component.name in {p.component.name for p in group}:
            groups.append([part])
        else:
            group.append(part)
    inputs = []
    for group in groups:
        weight = next((p.weight / p.component.weight for p in group if p.component.weight != 0), None)
        if weight is not None and not math.isfinite(weight):
            raise RequestError(f"{group[0].where}: its weight is not a finite number")
        effects: dict[str, tuple] = {}
        for part in group:
            component = part.component
            for target in component.targets:
                vector = part.tensors[target][ROLE].astype(np.float32) * np.float32(component.weight)
                target_flags = (feedforward(component, target), fan_in_fan_out(component, target))
                if target in effects:
                    known, known_flags, first = effects[target]
                    if known_flags[0] != target_flags[0] or known.shape != vector.shape:
                        raise RequestError(f"target {target!r}: {first.where} and {part.where} act on it differently "
                                           "(one scales its input, the other its output, or their shapes differ): "
                                           "one vector cannot hold both")
                    vector = known * vector
                    target_flags, part = known_flags, first
                effects[target] = (vector, target_flags, part)
        inputs.append((weight, effects))
    return inputs


def _composite_params(flags: dict[str, tuple[bool, bool]]) -> tuple[dict, dict]:
    """Component params from the most common flags; targets that differ get ``target_params``."""
    params = {flag: common(f[i] for f in flags.values()) for i, flag in enumerate(FLAGS)}
    target_params = {}
    for target, values in flags.items():
        override = {flag: value for flag, value in zip(FLAGS, values) if value != params[flag]}
        if override:
            target_params[target] = override
    return params, target_params
