"""Bottleneck adapters in torch: h' = h + w·(W_up · f(W_down · h + b_down) + b_up) on a module's output h
(Houlsby et al. 2019, eq. in §2.1; Pfeiffer et al. 2020).

Where it sits: after everything else that acts on the module. The adapter reads the module's output, so, unlike
LoRA's or BitFit's additive terms, it does not commute with them: a LoRA or a bias delta on the same module changes
the module, and the adapter sits after the changed module. :meth:`BottleneckRuntime.install` therefore puts a
:class:`BottleneckWrapper` *around* the module's :class:`~adapterkit.attach.wrapper.AdapterWrapper` (created first),
so the other kinds' entries run inside it whatever the order they were attached or exported in.

Several adapters on one module act side by side, each on h (never on another adapter's output): their weighted sum,
which is one wider adapter (ups scaled by wᵢ and concatenated along b, downs concatenated, up biases summed). This is
what :meth:`Runtime.combine` feeds the ONNX graph and what compose writes, so attach, compose and the export agree.

The non-linearity is a manifest parameter; the forward reads it from its tensors: attach gives it by name (from the
component), the ONNX graph as a float code per bottleneck unit (the ``non_linearity`` graph input, concatenated along
b like ``down``), so one graph serves adapters of any non-linearity, mixed on one module too. An unknown code gives
NaN, never another function.

Training start (AdapterHub's ``init_weights="mam_adapter"``, as LoRA starts): W_down ~ kaiming-uniform(a=√5) as
``nn.Linear`` initialises weights, b_down = 0, W_up = 0, b_up = 0: the adapter adds exactly 0, so training starts
from the base (Houlsby's near-identity initialisation, made exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from adapterkit import targets
from adapterkit.arrays import to_torch
from adapterkit.attach.rows import EACH_ROW
from adapterkit.attach.wrapper import AdapterWrapper, Derived, Entry, innermost, rows_of, share_rows
from adapterkit.errors import RequestError
from adapterkit.kinds.adapter import (DEFAULT_NON_LINEARITY, NON_LINEARITIES, ROLES, bottleneck_size,
                                      non_linearity_name)
from adapterkit.kinds.runtime import Runtime, in_dtype

#: f by name (transformers' ACT2FN functions: gelu is the exact erf form, gelu_new the tanh approximation)
FUNCTIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda z: F.gelu(z, approximate="tanh"),
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
}
#: the extra graph input (and entry tensor) that says f: a name in attach, codes [b] in the ONNX graph
SELECTOR = "non_linearity"
#: where install keeps this attach's bottleneck wrappers (in ``handle.shared``), by module path
SHARED = "adapter.wrappers"


def activate(z: torch.Tensor, selector) -> torch.Tensor:
    """f(z): one function by name, or, for codes ([b], one per bottleneck unit, as the ONNX graph is fed), each
    unit's own function, selected exactly (an unknown code gives NaN)."""
    if isinstance(selector, str):
        return FUNCTIONS[selector](z)
    codes = selector.to(z.dtype)
    out = torch.full_like(z, float("nan"))
    for code, name in enumerate(NON_LINEARITIES):
        out = torch.where(codes == code, FUNCTIONS[name](z), out)
    return out


def output_size(module: torch.nn.Module) -> int:
    """d, the output size of a Linear or Conv1D module."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    raise RequestError(f"a bottleneck adapter sits after a Linear or Conv1D module, not a {type(module).__name__}")


class BottleneckWrapper(AdapterWrapper):
    """Around a module's :class:`AdapterWrapper`: the module (with every other kind's entries), then all bottleneck
    entries side by side on its output, as one wider adapter (in a per-row attach: those of each adapter, on its rows)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        groups: dict[int, list[Entry]] = {}  # entries that act on the same rows (one adapter of a per-row attach)
        for entry in self.entries:
            groups.setdefault(next(i for i, e in enumerate(self.entries) if share_rows(e.source, entry.source)),
                              []).append(entry)
        module = innermost(self)
        for entries in groups.values():
            tensors, scale = RUNTIME.gather([(entry.source.tensors(), entry.scale) for entry in entries])
            y = RUNTIME.after_rows(module, x, y, tensors, scale, rows_of(entries[0].source))
        return y


class BottleneckRuntime(Runtime):
    dynamic_axes = {"down": 0, "down_bias": 0, "up": 1, SELECTOR: 0}

    def after(self, base, x, y, tensors, scale):
        """y + s·(W_up · f(W_down · y + b_down) + b_up): ``s`` scales the small up-projection, not the output."""
        up, up_bias = tensors["up"], tensors["up_bias"]
        if scale != 1.0:
            up, up_bias = up * scale, up_bias * scale
        down = tensors["down"]
        hidden = activate(F.linear(in_dtype(y, down.dtype), down, tensors["down_bias"]), tensors[SELECTOR])
        return y + in_dtype(F.linear(hidden, up, up_bias), y.dtype)

    def after_rows(self, base, x, y, tensors, scale, rows):
        """With a row's tensors per row (an ONNX adapter bank, ``rows`` :data:`EACH_ROW`): :meth:`after` as batched
        products, row b with its own down/up projections ([batch, ...] each); else as every kind."""
        if rows is not EACH_ROW:
            return super().after_rows(base, x, y, tensors, scale, rows)
        down, up, up_bias = tensors["down"], tensors["up"] * scale, tensors["up_bias"] * scale
        flat = in_dtype(y, down.dtype).reshape(y.shape[0], -1, y.shape[-1])  # [batch, tokens, d]
        hidden = activate(torch.bmm(flat, down.transpose(1, 2)) + tensors["down_bias"][:, None],
                          tensors[SELECTOR][:, None])
        change = torch.bmm(hidden, up.transpose(1, 2)) + up_bias[:, None]
        return y + in_dtype(change.reshape(y.shape), y.dtype)

    def fold(self, component, target, roles, weight):
        """w folded into the up-projection and its bias (f sits after the down-projection: not there), and f as one
        code per bottleneck unit."""
        code = NON_LINEARITIES.index(component.param(target, "non_linearity"))
        folded = {role: to_torch(roles[role]).float() for role in ROLES}
        folded["up"] = folded["up"] * weight
        folded["up_bias"] = folded["up_bias"] * weight
        folded[SELECTOR] = torch.full((roles["down"].shape[0],), float(code))
        return folded

    def gather(self, held: list[tuple[dict, float]]) -> tuple[dict, float]:
        """Several entries' tensors on one module as one wider adapter (and the scale to apply): each entry's scale
        folded into its up and up bias, then :meth:`combine` by role. The non-linearity stays a name while all
        entries share one, else becomes codes per unit."""
        if len(held) == 1:
            return held[0]
        scaled = [{**t, "up": t["up"] * s, "up_bias": t["up_bias"] * s} if s != 1.0 else t for t, s in held]
        combined = {role: self.combine(role, [t[role] for t in scaled]) for role in ROLES}
        names = {t[SELECTOR] for t in scaled if isinstance(t[SELECTOR], str)}
        if len(names) == 1 and all(isinstance(t[SELECTOR], str) for t in scaled):
            combined[SELECTOR] = names.pop()
        else:
            combined[SELECTOR] = torch.cat([_codes(t[SELECTOR], t["down"]) for t in scaled])
        return combined, 1.0

    def check_fits(self, module, path, component, target, roles) -> None:
        size = output_size(innermost(module))
        down, up = roles["down"], roles["up"]
        if down.shape[1] != size or up.shape[0] != size:
            raise RequestError(f"component {component.name!r}, target {target!r}: down {list(down.shape)} and up "
                               f"{list(up.shape)} do not fit {path} (outputs of size {size})")

    def install(self, handle, path, key, source, scale, component=None, target=None) -> None:
        """Into this attach's :class:`BottleneckWrapper` at ``path``, around the module's AdapterWrapper (see the
        module docstring)."""
        wrappers = handle.shared.setdefault(SHARED, {})
        if path not in wrappers:
            inner = handle.wrapper(path)  # every other kind's entries on this module go in here
            outer = BottleneckWrapper(inner)
            outer.train(inner.training)
            handle.model.set_submodule(path, outer)
            handle.on_detach(lambda: handle.model.set_submodule(path, inner))
            wrappers[path] = outer
        function = None if component is None else component.param(target, "non_linearity")
        if function is None and SELECTOR not in source.tensors():
            raise RequestError(f"{path}: a bottleneck adapter entry needs its non-linearity")
        outer = wrappers[path]
        if isinstance(source, torch.nn.Module):
            outer.adapters[key] = source
        named = source if function is None else Derived(source, lambda tensors: {**tensors, SELECTOR: function})
        outer.entries.append(Entry(self, named, scale))

    def candidates(self, model, head):
        return targets.linear_modules(model, head)

    def default_targets(self, model, head):
        """Pfeiffer et al.'s placement: after each feed-forward output projection (half of Houlsby's adapters, about
        as good in their experiments, and AdapterHub's default ``seq_bn``)."""
        found = targets.feedforward_outputs(model, head)
        if not found:
            raise RequestError(f"found no feed-forward output projections in {type(model).__name__}: pass --targets")
        return found

    def initial(self, model, names, options, generator):
        reduction_factor = float(options.get("reduction_factor", 16.0))
        function = non_linearity_name(options.get("non_linearity", DEFAULT_NON_LINEARITY))
        tensors, sizes = {}, {}
        for name in names:
            d = output_size(model.get_submodule(name))
            b = bottleneck_size(d, reduction_factor)
            bound = 1 / math.sqrt(d)  # kaiming_uniform_(a=√5) on a [b, d] matrix, as nn.Linear does
            tensors[name] = {"down": torch.empty(b, d).uniform_(-bound, bound, generator=generator),
                             "down_bias": torch.zeros(b), "up": torch.zeros(d, b), "up_bias": torch.zeros(d)}
            sizes[name] = b
        common = max(set(sizes.values()), key=list(sizes.values()).count)
        target_params = {name: {"bottleneck": b} for name, b in sizes.items() if b != common}
        params = {"bottleneck": common, "non_linearity": function, "placement": placement(model, names)}
        return params, target_params, tensors


def placement(model: torch.nn.Module, names) -> str:
    """houlsby (after every attention and feed-forward output projection), pfeiffer (after every feed-forward output
    projection) or custom."""
    chosen = set(names)
    feedforward = set(targets.feedforward_outputs(model))
    if feedforward and chosen == feedforward:
        return "pfeiffer"
    if feedforward and chosen == feedforward | set(targets.attention_outputs(model)):
        return "houlsby"
    return "custom"


def _codes(selector, down: torch.Tensor) -> torch.Tensor:
    """An entry's non-linearity as one code per bottleneck unit."""
    if isinstance(selector, str):
        return torch.full((down.shape[0],), float(NON_LINEARITIES.index(selector)), dtype=down.dtype,
                          device=down.device)
    return selector.to(down.dtype)


RUNTIME = BottleneckRuntime()
