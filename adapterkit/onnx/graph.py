"""ONNX graph surgery: give the adapter-slot inputs a default value, so that feeding them is optional.

An ONNX graph input that also has an initializer of the same name is an *overridable initializer*: ONNX Runtime uses
the initializer unless the caller (or an active ``.onnx_adapter``) feeds the input. This is the layout its adapter API
needs (Microsoft Olive writes the same): plain initializers are rejected ("Invalid input name") and required inputs
must always be fed. The defaults are empty tensors along the dynamic rank / prefix dim (r = 0, p = 0), zeros for
BitFit, the base tensor for ``full`` slots: together, the base model.
"""

from __future__ import annotations

import onnx
import torch
from onnx import numpy_helper


def add_defaults(model: onnx.ModelProto, defaults: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """Add an initializer named like each slot input, holding its default; returns ``model`` (changed in place)."""
    inputs = {i.name for i in model.graph.input}
    existing = {i.name for i in model.graph.initializer}
    for name, tensor in defaults.items():
        if name not in inputs:
            raise ValueError(f"the exported graph has no input {name!r}")  # a bug in the exporter, not bad input
        if name in existing:
            continue
        value = tensor.detach() if not tensor.is_floating_point() else tensor.detach().float()  # a bank's lengths: int64
        model.graph.initializer.append(numpy_helper.from_array(value.numpy(), name))
    return model


def io_description(model: onnx.ModelProto, names) -> list[dict]:
    """``[{name, dtype, shape}]`` for the named graph inputs or outputs (symbolic dims as strings)."""
    values = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    described = []
    for name in names:
        tensor_type = values[name].type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        described.append({"name": name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
                          "shape": shape})
    return described
