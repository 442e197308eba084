"""BitFit (Ben Zaken et al. 2022): only bias terms are trained. A target holds ``bias``, the delta Δb added to the
base module's bias (a base module without a bias gets one that starts at zero)."""

from __future__ import annotations

from adapterkit.errors import AdapterError
from adapterkit.kinds import Kind


class BitFit(Kind):
    name = "bitfit"
    roles = ("bias",)

    def check(self, component, tensors) -> None:
        for target in component.targets:
            bias = tensors[target]["bias"]
            if bias.ndim != 1:
                raise AdapterError(
                    f"component {component.name!r}, target {target!r}: bias must be 1-D, got {list(bias.shape)}"
                )

    delta_parameter = "bias"

    def delta_shape(self, component, target, roles) -> list[int]:
        return list(roles["bias"].shape)

    def add_delta(self, component, target, roles, out) -> None:
        out.add_(roles["bias"].float(), alpha=component.weight)
