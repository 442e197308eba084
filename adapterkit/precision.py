"""A frozen base model held in a lower precision while an adapter trains in float32 on top (QLoRA's recipe, Dettmers
et al. 2023: the base's weights quantized and frozen, the adapter's own tensors in full precision, gradients flowing
through the dequantized weights to the adapter).

Precisions (``--base-precision``):

- ``float32``: the base as loaded (the default);
- ``bfloat16``: every parameter of the base in bfloat16, computed in bfloat16;
- ``int8``: the weight of every linear layer of the base in int8, one float32 scale per output row (absmax,
  symmetric): torchao's weight-only int8 (``quantize_`` with ``Int8WeightOnlyConfig``, the format PEFT's torchao
  support trains over). Its linear runs above autograd, which then keeps the dequantized float32 copy of every weight
  for the backward pass (measured: training over it took about as much memory as over float32), so the module runs
  it inside :class:`FrozenInt8Linear`, which keeps the int8 weight instead and dequantizes it again for the
  backward pass, as torchao's NF4 linear does (torchao's ``Int8QuantizedTrainingLinearWeight`` does that too, but
  also computes the weight's gradient, measured 1.4 times slower, and fails on some non-contiguous gradients);
- ``nf4``: the weight of every linear layer in 4-bit NormalFloat, blocks of 64 with double-quantized scales
  (torchao's ``NF4Tensor``, what torchtune's QLoRA uses).

For ``int8`` and ``nf4`` everything else (embeddings, norms, biases, the output head) stays in float32, and so does the
computation: a quantized weight is dequantized to float32 for each product, in the forward and the backward pass
(measured on an AVX2 CPU: bfloat16 matrix products are about 20 times slower than float32 ones). The output heads
(``lm_head``, ``classifier``, ``score``, ... and a new task head) are never quantized, as in QLoRA.

The quantized weights stay inside the model's own ``nn.Linear`` modules as tensor subclasses with the weight's
shape, so every kind's runtime finds the modules it knows; :func:`dense` gives a weight's value back (DoRA's norm,
``full``'s starting copy). The adapter's tensors stay float32 over any precision (attach with ``dtype=float32``); the
runtimes compute the adapter in its own dtype and hand the module's output back in the base's.

The adapter belongs to the full-precision base it was trained over: the manifest records the checkpoint folder's
fingerprints (a quantized model no longer gives its weights back, so attach checks it against the folder) and the
precision in ``training.base_precision``.
"""

from __future__ import annotations

import logging
from typing import Iterable

from adapterkit.errors import RequestError

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "int8", "nf4")
QUANTIZED = ("int8", "nf4")
#: NF4: values per block with one scale (QLoRA's 64), and scales per block of the second quantization (QLoRA's 256)
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
#: name segments of output heads, never quantized (QLoRA keeps the LM head in full precision)
HEAD_SEGMENTS = frozenset({"lm_head", "embed_out", "classifier", "score", "qa_outputs", "pre_classifier", "cls",
                           "vocab_projector", "vocab_transform"})


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise RequestError(f"unknown base precision {precision!r} (known: {', '.join(PRECISIONS)})")
    return precision


def is_quantized_precision(precision: str) -> bool:
    return check(precision) in QUANTIZED


def compute_dtype(precision: str):
    """The dtype the base computes in (and holds its unquantized tensors in) at ``precision``."""
    import torch

    return torch.bfloat16 if check(precision) == "bfloat16" else torch.float32


def _torchao():
    """torchao's quantization module. Its import warns about its CUDA-only extensions on a CPU machine: that note
    goes to the debug log, not the screen."""
    import sys

    if "torchao.quantization" not in sys.modules:
        logger = logging.getLogger("torchao")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            import torchao.quantization  # noqa: F401
        except ImportError:
            raise RequestError("training over an int8 or nf4 base needs torchao: pip install torchao") from None
        finally:
            logger.setLevel(level)
    return sys.modules["torchao.quantization"]


def _quantized_types() -> tuple[type, ...]:
    import sys

    quantization = sys.modules.get("torchao.quantization")
    if quantization is None:  # nothing can be quantized before torchao is imported
        return ()
    return (quantization.NF4Tensor, quantization.Int8Tensor)


def is_quantized(tensor) -> bool:
    """Whether ``tensor`` is a quantized weight (see :func:`hold`)."""
    types = _quantized_types()
    return bool(types) and isinstance(tensor, types)


def dense(tensor, dtype=None):
    """The value of a weight as a plain tensor in ``dtype`` (default: its own): a quantized weight dequantized, a
    plain one as it is (converted where ``dtype`` differs)."""
    if is_quantized(tensor):
        if isinstance(tensor, _torchao().NF4Tensor):
            return tensor.get_original_weight().to(dtype or tensor.dtype)
        return tensor.dequantize(dtype or tensor.dtype)
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _nf4_scaler_block(blocks: int) -> int | None:
    """The largest power of two ≤ 256 that divides the number of NF4 blocks (torchao needs whole scaler blocks)."""
    size = NF4_SCALER_BLOCK
    while size > 1 and blocks % size:
        size //= 2
    return size if blocks % size == 0 else None


def quantize_weight(weight, precision: str):
    """A frozen weight matrix in ``precision`` (``int8`` or ``nf4``); None when that format cannot hold its shape."""
    import torch

    _torchao()
    value = weight.detach()
    if precision == "nf4":
        if value.numel() % NF4_BLOCK:
            return None
        from torchao.quantization import to_nf4

        return to_nf4(value, NF4_BLOCK, _nf4_scaler_block(value.numel() // NF4_BLOCK))
    if precision == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        holder = torch.nn.Linear(value.shape[1], value.shape[0], bias=False, device="meta")
        holder.weight = torch.nn.Parameter(value, requires_grad=False)
        quantize_(holder, Int8WeightOnlyConfig())
        return holder.weight.detach()
    raise RequestError(f"{precision} is not a quantized precision")


def quantizable(name: str, module, keep: Iterable[str] = ()) -> bool:
    """Whether :func:`hold` quantizes module ``name``: a ``nn.Linear`` with a plain 2-D weight, outside ``keep``
    (new task heads) and the output heads."""
    import torch

    from adapterkit.targets import outside

    return (isinstance(module, torch.nn.Linear) and outside(name, list(keep))
            and HEAD_SEGMENTS.isdisjoint(name.split(".")) and isinstance(module.weight, torch.Tensor)
            and module.weight.ndim == 2 and module.weight.is_floating_point() and not is_quantized(module.weight))


def hold(model, precision: str, keep: Iterable[str] = ()) -> dict[str, int]:
    """Put the base ``model`` (frozen) in ``precision`` in place, module by module: ``bfloat16`` converts every
    floating-point parameter, ``int8`` and ``nf4`` quantize the weight of every linear layer :func:`quantizable`
    allows (modules under ``keep`` are left alone). Returns ``{"quantized": n, "kept": n}``, the linear layers
    quantized and those left in float32 (a shape the format cannot hold)."""
    import torch

    check(precision)
    counts = {"quantized": 0, "kept": 0}
    if precision == "float32":
        return counts
    if precision == "bfloat16":
        for parameter in model.parameters():
            if parameter.is_floating_point() and not is_quantized(parameter):
                parameter.data = parameter.data.to(torch.bfloat16)
        return counts
    for name, module in list(model.named_modules()):
        if not quantizable(name, module, keep):
            continue
        quantized = quantize_weight(module.weight, precision)
        if quantized is None:
            counts["kept"] += 1
            log.info("%s stays in float32: %s cannot hold a weight of shape %s", name, precision,
                     list(module.weight.shape))
            continue
        module.weight = torch.nn.Parameter(quantized, requires_grad=False)
        if precision == "int8" and type(module) is torch.nn.Linear:
            module.__class__ = frozen_int8_linear_class()  # same module, same state; see FrozenInt8Linear
        counts["quantized"] += 1
    log.info("base held in %s: %d linear layers quantized, %d kept in float32", precision, counts["quantized"],
             counts["kept"])
    return counts


_CLASSES: dict[str, type] = {}


def frozen_int8_linear_class() -> type:
    """``FrozenInt8Linear``: an ``nn.Linear`` whose weight is held in int8 (torchao's ``Int8Tensor``). Its forward
    runs torchao's int8 linear inside an autograd function that keeps the int8 weight for the backward pass, where
    it is dequantized again to give the input its gradient (the frozen weight and bias get none), instead of the
    float32 copy autograd would keep. Still an ``nn.Linear``: every kind finds it as it found the module. Made on
    first use (it needs torch)."""
    if "int8" not in _CLASSES:
        import torch
        import torch.nn.functional as F

        class FrozenQuantizedLinear(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, bias):
                ctx.save_for_backward(weight)
                return F.linear(x, weight, bias)  # the library's own quantized linear (autograd is off in here)

            @staticmethod
            def backward(ctx, grad):
                (weight,) = ctx.saved_tensors
                grad_x = grad @ dense(weight, grad.dtype) if ctx.needs_input_grad[0] else None
                grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
                return grad_x, None, grad_bias

        class FrozenInt8Linear(torch.nn.Linear):
            __doc__ = frozen_int8_linear_class.__doc__

            def forward(self, x):
                weight = self.weight  # a plain tensor where a full adapter replaces it (then it trains as usual)
                if not torch.is_grad_enabled() or not is_quantized(weight):
                    return F.linear(x, weight, self.bias)
                return FrozenQuantizedLinear.apply(x, weight, self.bias)

        _CLASSES["int8"] = FrozenInt8Linear
    return _CLASSES["int8"]


def held_bytes(model) -> int:
    """Bytes the model's parameters and buffers hold, as held (a quantized weight by its packed data and scales), each
    storage counted once."""
    seen, total = set(), 0

    def visit(tensor) -> None:
        nonlocal total
        flatten = getattr(type(tensor), "__tensor_flatten__", None)
        if flatten is not None and is_quantized(tensor):
            for name in tensor.__tensor_flatten__()[0]:
                visit(getattr(tensor, name))
            return
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        visit(tensor)
    return total
