"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353).

A target holds LoRA's factors ``lora_A`` [r, in] and ``lora_B`` [out, r] and a ``magnitude`` m [out]. The weight is
split into a length per output row and a direction (Liu et al. eq. 2); LoRA updates the direction, m replaces the
length (eq. 5). In the math layout [out, in]:

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖        one Euclidean norm per output row (PEFT: ``linalg.norm(·, dim=1)``)

with s and the weight layout (``fan_in_fan_out``) as for LoRA (s = α/r, or α/√r for rsLoRA). Its params are LoRA's.

Weight 1 only: the effect W' − W is not linear in the adapter's tensors (m sets each row's length), and w times it is
a DoRA component only with a new magnitude that is a row norm of the *base* weight. Composition is refused for the
same reason: the combined magnitude would be a row norm of the base weight plus the combined update, and composition
never sees the base weights.
"""

from __future__ import annotations

import math

from adapterkit.errors import FormatError, RequestError
from adapterkit.kinds.base import Kind
from adapterkit.kinds.lora import ALPHA, RANK, LoRA, check_factors

ROLES = ("lora_A", "lora_B", "magnitude")
#: why a DoRA component cannot be weighted (also in the messages of attach, merge and the export)
UNWEIGHTED = ("its magnitude sets the length of each row of the adapted weight, so its effect is not linear in its "
              "tensors")
#: why DoRA components cannot be composed
NOT_COMPOSABLE = ("the magnitude of a combination would be a row norm of the base weight plus the combined update, "
                  "and composition does not see the base weights")
SCALINGS = ("standard", "rslora")


class DoRA(Kind):
    name = "dora"
    summary = "weight-decomposed low-rank updates W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖"
    roles = ROLES
    weighted = False
    unweighted_reason = UNWEIGHTED
    default_lr = 1e-3
    train_options = (RANK, ALPHA)  # LoRA's own: --rank and --alpha are shared

    def check(self, component, tensors) -> None:
        _check_params(component.name, component.params, required=True)
        for target, override in component.target_params.items():
            _check_params(component.name, override, required=False, target=target)
        for target in component.targets:
            roles = tensors[target]
            a, b, magnitude = roles["lora_A"], roles["lora_B"], roles["magnitude"]
            check_factors(component, target, a, b, conv=False)
            if magnitude.ndim != 1 or magnitude.shape[0] != b.shape[0]:
                raise FormatError(f"component {component.name!r}, target {target!r}: magnitude must be 1-D with one "
                                  f"entry per output row ([{b.shape[0]}], as lora_B {list(b.shape)}), "
                                  f"got {list(magnitude.shape)}")

    describe = LoRA.describe  # the same ranks and scales on the inspect line
    detail = LoRA.detail

    def compose(self, parts, request, name):
        raise RequestError(f"components of kind {self.name!r} cannot be composed: {NOT_COMPOSABLE}")


def _check_params(component: str, params: dict, required: bool, target: str | None = None) -> None:
    """LoRA's params (spec §6.2), checked here as well as by the schema."""
    where = f"component {component!r}" + (f", target {target!r}" if target else "")
    for key in ("rank", "alpha"):
        if required and key not in params:
            raise FormatError(f"{where}: params lack {key!r}")
    rank = params.get("rank", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise FormatError(f"{where}: rank must be an integer ≥ 1, got {rank!r}")
    alpha = params.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise FormatError(f"{where}: alpha must be a finite number, got {alpha!r}")
    if params.get("scaling", "standard") not in SCALINGS:
        raise FormatError(f"{where}: scaling must be one of {', '.join(SCALINGS)}, got {params['scaling']!r}")
    if not isinstance(params.get("fan_in_fan_out", False), bool):
        raise FormatError(f"{where}: fan_in_fan_out must be true or false, got {params['fan_in_fan_out']!r}")
