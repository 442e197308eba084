"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al. 2020,
"AdapterFusion: Non-Destructive Task Composition for Transfer Learning"): the kind ``adapter``.

A target is the module after whose output the adapter sits (a Linear or Conv1D layer with output size d). It holds
``down`` [b, d], ``down_bias`` [b], ``up`` [d, b] and ``up_bias`` [d]; with the module's output h and the component's
weight w,

    h' = h + w · (W_up · f(W_down · h + b_down) + b_up)

a residual bottleneck of size b (``bottleneck``) with the non-linearity f (``non_linearity``, AdapterHub's names).
Houlsby's placement puts one after each attention output projection and each feed-forward output projection;
Pfeiffer's only after the feed-forward output projection (``placement`` records which; the targets are what act).

f sits between the two projections, so the adapter is no change of base weights: it cannot be merged. A weighted sum
of adapters at one module is one wider adapter, exactly: f acts element by element, so
Σ wᵢ (Uᵢ f(Dᵢ h + cᵢ) + uᵢ) = [w₁U₁ … wₙUₙ] · f([D₁; …; Dₙ] h + [c₁; …; cₙ]) + Σ wᵢ uᵢ. Composition does that.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.base import Composed, Kind, TrainOption
from adapterkit.manifest import Component

ROLES = ("down", "down_bias", "up", "up_bias")
#: the non-linearities f, by AdapterHub's names (transformers' ACT2FN); their order is the code the ONNX graph reads
#: (append only)
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "swish", "tanh", "sigmoid", "leakyrelu")
#: other names of the same functions (as AdapterHub accepts them), read as the name on the right
ALIASES = {"silu": "swish", "leaky_relu": "leakyrelu", "gelu_pytorch_tanh": "gelu_new"}
#: where the targets sit, as train and the AdapterHub reader write it (informative: the targets are what act)
PLACEMENTS = ("houlsby", "pfeiffer", "custom")
DEFAULT_NON_LINEARITY = "relu"  # AdapterHub's seq_bn (Pfeiffer) default

REDUCTION_FACTOR = TrainOption("reduction_factor", "number", 16.0,
                               "Bottleneck adapter: output size / bottleneck size (AdapterHub's reduction_factor).",
                               low=1.0, high=1e6)


def non_linearity_name(name) -> str:
    """The canonical name of a non-linearity (aliases and case resolved), or a RequestError."""
    canonical = ALIASES.get(str(name).lower(), str(name).lower()) if isinstance(name, str) else None
    if canonical not in NON_LINEARITIES:
        raise RequestError(f"unknown non_linearity {name!r} (known: {', '.join(NON_LINEARITIES)})")
    return canonical


def bottleneck_size(output_size: int, reduction_factor: float) -> int:
    """b = ⌊d / reduction_factor⌋, at least 1 (as AdapterHub computes it)."""
    return max(1, int(output_size // reduction_factor))


class BottleneckAdapter(Kind):
    name = "adapter"
    summary = "bottleneck adapters h + W_up·f(W_down·h) after a module"
    roles = ROLES
    unmergeable = ("its non-linearity sits between the down- and up-projection, so its effect is not a change of "
                   "base weights and it cannot be merged into a checkpoint")
    default_lr = 1e-3  # the top of AdapterHub's usual 1e-4..1e-3; on the tiny example it beats LoRA's default run
    train_options = (REDUCTION_FACTOR,)

    def unmergeable_reason(self, component) -> str:
        return (f"component {component.name!r} is a bottleneck adapter: {self.unmergeable}; attach it "
                "(adapterkit.attach) or export it unmerged (adapterkit export --onnx --unmerged) instead")

    def check(self, component, tensors) -> None:
        placement = component.params.get("placement")
        if placement is not None and not isinstance(placement, str):  # informative: any name a later writer uses
            raise FormatError(f"component {component.name!r}: placement must be a string, got {placement!r}")
        for target in component.targets:
            check_target(component, target, tensors[target])

    def describe(self, component, tensors) -> dict:
        return {"bottlenecks": sorted({int(roles["down"].shape[0]) for roles in tensors.values()}),
                "non_linearities": sorted({component.param(t, "non_linearity") for t in component.targets}),
                "placement": component.params.get("placement")}

    def detail(self, entry) -> str:
        text = (f"bottleneck {'/'.join(map(str, entry['bottlenecks']))}, "
                f"{'/'.join(entry['non_linearities'])}")
        return text + (f", {entry['placement']} placement" if entry.get("placement") else "")

    def compose(self, parts, request, name) -> Composed:
        """Per target (the union, in first-seen order) one wider adapter: downs and down biases concatenated along b,
        the wᵢ-scaled ups concatenated along b, the wᵢ-scaled up biases summed. Exact (see the module docstring)."""
        by_target: dict[str, list] = {}
        for part in parts:
            if not math.isfinite(part.weight):
                raise RequestError(f"{part.where}: weight {part.weight} is not a finite number")
            for target in part.component.targets:
                by_target.setdefault(target, []).append((part, part.tensors[target],
                                                          part.component.param(target, "non_linearity")))
        held, sizes, functions = {}, {}, {}
        for target, entries in by_target.items():
            first, roles0, f0 = entries[0]
            for part, roles, f in entries[1:]:
                if f != f0:
                    raise RequestError(f"target {target!r}: non-linearities disagree, {first.where} has {f0} but "
                                       f"{part.where} has {f}: one adapter applies one non-linearity per target")
                if roles["up"].shape[0] != roles0["up"].shape[0]:
                    raise RequestError(f"target {target!r}: shapes disagree, {first.where} acts on outputs of size "
                                       f"{roles0['up'].shape[0]} but {part.where} on size {roles['up'].shape[0]}")
            weights = [np.float32(part.weight) for part, _, _ in entries]
            held[target] = {
                "down": np.concatenate([r["down"].astype(np.float32) for _, r, _ in entries], axis=0),
                "down_bias": np.concatenate([r["down_bias"].astype(np.float32) for _, r, _ in entries]),
                "up": np.concatenate([r["up"].astype(np.float32) * w for (_, r, _), w in zip(entries, weights)],
                                     axis=1),
                "up_bias": sum(r["up_bias"].astype(np.float32) * w for (_, r, _), w in zip(entries, weights)),
            }
            sizes[target], functions[target] = int(held[target]["down"].shape[0]), f0
        params, target_params = _common_params(sizes, functions)
        placement = _composed_placement([part.component.params.get("placement") for part in parts])
        if placement is not None:
            params["placement"] = placement
        return Composed(Component(name, self.name, list(held), params, target_params), held)


def check_target(component: Component, target: str, roles) -> None:
    """The shape and parameter rules of one target (spec §6, ``adapter``)."""
    where = f"component {component.name!r}, target {target!r}"
    down, down_bias, up, up_bias = (roles[r] for r in ROLES)
    if down.ndim != 2 or up.ndim != 2 or down_bias.ndim != 1 or up_bias.ndim != 1:
        raise FormatError(f"{where}: down and up must be 2-D, down_bias and up_bias 1-D, got {list(down.shape)}, "
                          f"{list(up.shape)}, {list(down_bias.shape)} and {list(up_bias.shape)}")
    b, d = down.shape
    if up.shape[1] != b or down_bias.shape[0] != b:
        raise FormatError(f"{where}: bottleneck mismatch, down is {list(down.shape)} (bottleneck {b}) but up is "
                          f"{list(up.shape)} and down_bias {list(down_bias.shape)}")
    if up.shape[0] != d or up_bias.shape[0] != d:
        raise FormatError(f"{where}: size mismatch, down reads outputs of size {d} but up is {list(up.shape)} and "
                          f"up_bias {list(up_bias.shape)}")
    size = component.param(target, "bottleneck")
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not float(size).is_integer() or size < 1:
        raise FormatError(f"{where}: bottleneck must be an integer ≥ 1, got {size!r}")
    if size != b:
        raise FormatError(f"{where}: manifest says bottleneck {size} but down is {list(down.shape)}")
    function = component.param(target, "non_linearity")
    if function not in NON_LINEARITIES:
        raise FormatError(f"{where}: unknown non_linearity {function!r} (known: {', '.join(NON_LINEARITIES)})")


def _common_params(sizes: dict[str, int], functions: dict[str, str]) -> tuple[dict, dict]:
    """Component params from the most common bottleneck and non-linearity; targets that differ get
    ``target_params``."""
    size = Counter(sizes.values()).most_common(1)[0][0]
    function = Counter(functions.values()).most_common(1)[0][0]
    target_params = {}
    for target in sizes:
        override = {}
        if sizes[target] != size:
            override["bottleneck"] = sizes[target]
        if functions[target] != function:
            override["non_linearity"] = functions[target]
        if override:
            target_params[target] = override
    return {"bottleneck": size, "non_linearity": function}, target_params


def _composed_placement(placements: list) -> str | None:
    """The placement of a composite over the union of targets on one base: Pfeiffer's targets are a subset of
    Houlsby's, so houlsby ∪ pfeiffer is houlsby; anything else unknown or custom makes it custom."""
    known = set(placements)
    if known == {None}:
        return None
    if known <= {"pfeiffer"}:
        return "pfeiffer"
    if known <= {"houlsby", "pfeiffer"}:
        return "houlsby"
    return "custom"
