"""(IA)³ in torch: the forward, the merge, the training start (Liu et al. 2022, arXiv:2205.05638; as PEFT's
``tuners/ia3/layer.py``).

Forward: an output target gives y = base(x) ⊙ (w·l) (:meth:`IA3Runtime.after`); a feed-forward target gives
y = base(x ⊙ w·l) (:meth:`IA3Runtime.before`). Several entries on one module multiply, in attach order.

Which of the two a target is lives in the manifest (``feedforward``), which the wrapper's entries do not see: attach
installs a feed-forward target's entry with :data:`FEEDFORWARD_ENTRY` (its vector scales the input), every other one
with :data:`RUNTIME`. The ONNX export feeds the two as different slots instead: ``<module>.ia3.ia3_l`` (output) and
``<module>.ia3.ia3_l_ff`` (input), each the product of its adapters' w·l, ones when no adapter fills it.

Merge, in the stored layout ([out, in] for ``nn.Linear``, [in, out] for Conv1D: ``fan_in_fan_out``): an output target
scales W's output rows and the bias, b ⊙ (w·l) (a module without a bias has nothing to scale); a feed-forward target
scales W's input columns, W·diag(w·l), and leaves the bias alone. Unmerge divides by the same vector; a vector with a
zero erased what it multiplied, so unmerging it is refused.

Training starts from l = 1 (the model starts as the base) on the key and value projections and each block's
feed-forward output projection (PEFT's defaults: Llama's k_proj, v_proj, down_proj; GPT-2's c_attn, mlp.c_proj;
BERT's key, value, output.dense), the last of them feed-forward.
"""

from __future__ import annotations

import logging

import torch
from transformers.pytorch_utils import Conv1D

from adapterkit import targets
from adapterkit.arrays import to_torch
from adapterkit.errors import RequestError
from adapterkit.kinds.ia3 import FLAGS, ROLE, common, fan_in_fan_out, feedforward
from adapterkit.kinds.runtime import Runtime, in_dtype

log = logging.getLogger(__name__)

#: the ONNX slot role of a feed-forward target's vector (an output target's is ``ia3_l`` itself)
FEEDFORWARD_SLOT = "ia3_l_ff"


def features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of a module (IA)³ can rescale."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise RequestError(f"(IA)³ rescales Linear and Conv1D modules, not {type(module).__name__}")


class IA3Runtime(Runtime):
    """``input_role`` / ``output_role``: the role whose vector this entry multiplies the module's input / output by."""

    merged_parameters = ("weight", "bias")
    optional_parameters = ("bias",)

    def __init__(self, input_role: str | None = FEEDFORWARD_SLOT, output_role: str | None = ROLE):
        self.input_role, self.output_role = input_role, output_role

    # -- forward ------------------------------------------------------------------------------------------------------

    def before(self, base, x, tensors, scale):
        vector = tensors.get(self.input_role) if self.input_role else None
        if vector is None:
            return x
        return in_dtype(x * (vector if scale == 1.0 else vector * scale), x.dtype)

    def after(self, base, x, y, tensors, scale):
        vector = tensors.get(self.output_role) if self.output_role else None
        if vector is None:
            return y
        return in_dtype(y * (vector if scale == 1.0 else vector * scale), y.dtype)

    def fold(self, component, target, roles, weight):
        scale = self.scale(component, target, roles, weight)
        slot = FEEDFORWARD_SLOT if feedforward(component, target) else ROLE
        return {slot: to_torch(roles[ROLE]).float() * scale}

    def combine(self, role, tensors):
        """Several adapters' vectors on one module multiply."""
        return tensors[0] if len(tensors) == 1 else torch.stack(list(tensors)).prod(0)

    def empty(self, role, example, module):
        """No adapter: a vector of ones, which leaves the module as it is."""
        return torch.ones(example.shape)

    # -- installing ---------------------------------------------------------------------------------------------------

    def check_fits(self, module, path, component, target, roles) -> None:
        from adapterkit.attach.wrapper import innermost

        inner = innermost(module)
        in_features, out_features = features(inner)
        is_feedforward = feedforward(component, target)
        size, side = (in_features, "inputs") if is_feedforward else (out_features, "outputs")
        vector = roles[ROLE]
        if vector.shape != (size,):
            raise RequestError(f"component {component.name!r}, target {target!r}: ia3_l is {list(vector.shape)} but "
                               f"{path} {'takes' if is_feedforward else 'gives'} {side} of size {size}"
                               + (" (feed-forward)" if is_feedforward else ""))
        if fan_in_fan_out(component, target) != isinstance(inner, Conv1D):
            log.warning("component %r, target %r: fan_in_fan_out is %s but %s stores its weight as %s; merging it "
                        "would scale the wrong axis", component.name, target, fan_in_fan_out(component, target),
                        path, "[in, out]" if isinstance(inner, Conv1D) else "[out, in]")

    def install(self, handle, path, key, source, scale, component=None, target=None) -> None:
        """An attached target's entry: :data:`FEEDFORWARD_ENTRY` where the manifest says ``feedforward``. (The slots
        of the ONNX export name their side in their role: ``ia3_l`` or ``ia3_l_ff``.)"""
        runtime = FEEDFORWARD_ENTRY if component is not None and feedforward(component, target) else self
        handle.wrapper(path).add(key, runtime, source, scale)

    # -- merge --------------------------------------------------------------------------------------------------------

    def merge(self, component, target, roles, parameter, tensor, weight):
        vector = self._vector(component, target, roles, parameter, tensor, weight)
        if vector is None:
            return
        if parameter == "weight" and bool((vector == 0).any()):
            log.warning("component %r, target %r: its vector times the weight holds a zero; the merged weights "
                        "cannot be unmerged", component.name, target)
        tensor.mul_(vector)

    def unmerge(self, component, target, roles, parameter, tensor, weight, record):
        vector = self._vector(component, target, roles, parameter, tensor, weight)
        if vector is None:
            return
        if bool((vector == 0).any()):
            raise RequestError(f"component {component.name!r}, target {target!r}: its vector times the weight "
                               f"({weight:g}) holds a zero, which erased what it multiplied: it cannot be unmerged "
                               "(merge again from the base instead)")
        tensor.div_(vector)

    def _vector(self, component, target, roles, parameter, tensor, weight) -> torch.Tensor | None:
        """w·l shaped to multiply ``tensor`` (the base's ``parameter``, stored layout), or None where the target
        leaves that parameter alone (a feed-forward target's bias)."""
        vector = to_torch(roles[ROLE]).to(tensor.dtype) * weight
        is_feedforward = feedforward(component, target)
        if parameter == "bias":
            if is_feedforward:
                return None
            if tensor.shape != vector.shape:
                raise RequestError(f"component {component.name!r}, target {target!r}: ia3_l is "
                                   f"{list(vector.shape)}, the base bias {list(tensor.shape)}")
            return vector
        transposed = fan_in_fan_out(component, target)
        axis = (1 if is_feedforward else 0) ^ int(transposed)  # [out, in]: outputs are rows; [in, out]: columns
        if tensor.ndim != 2 or tensor.shape[axis] != vector.shape[0]:
            raise RequestError(f"component {component.name!r}, target {target!r}: ia3_l is {list(vector.shape)}, "
                               f"the base weight {list(tensor.shape)} has {'inputs' if is_feedforward else 'outputs'} "
                               f"along dimension {axis} (fan_in_fan_out={transposed})")
        return vector[:, None] if axis == 0 else vector

    # -- training -----------------------------------------------------------------------------------------------------

    def candidates(self, model, head):
        return [name for name, module in model.named_modules()
                if isinstance(module, targets.linear_types()) and targets.outside(name, head)]

    def default_targets(self, model, head):
        chosen = set(targets.key_value_projections(model, head)) | set(targets.feedforward_outputs(model, head))
        if not chosen:
            raise RequestError(f"found no key/value projections or feed-forward outputs in {type(model).__name__}: "
                               "pass --targets")
        return [name for name, _ in model.named_modules() if name in chosen]

    def initial(self, model, names, options, generator):
        feedforward_modules = set(targets.feedforward_outputs(model))
        tensors, flags = {}, {}
        for name in names:
            module = model.get_submodule(name)
            in_features, out_features = features(module)
            is_feedforward = name in feedforward_modules
            tensors[name] = {ROLE: torch.ones(in_features if is_feedforward else out_features)}
            flags[name] = {"feedforward": is_feedforward, "fan_in_fan_out": isinstance(module, Conv1D)}
        params = {flag: common(f[flag] for f in flags.values()) for flag in FLAGS}
        target_params = {name: override for name, values in flags.items()
                         if (override := {k: v for k, v in values.items() if v != params[k]})}
        return params, target_params, tensors


RUNTIME = IA3Runtime()
#: the entry of an attached feed-forward target: its stored vector scales the module's input
FEEDFORWARD_ENTRY = IA3Runtime(input_role=ROLE, output_role=None)
FEEDFORWARD_ENTRY.kind = "ia3"
