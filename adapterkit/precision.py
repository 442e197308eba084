"""A frozen base model held in a lower precision while an adapter trains in float32 on top (QLoRA's recipe, Dettmers
et al. 2023: the base's weights quantized and frozen, the adapter's own tensors in full precision, gradients flowing
through the dequantized weights to the adapter).

Precisions (``--base-precision``):

- ``float32``: the base as loaded (the default);
- ``bfloat16``: on a GPU, every parameter of the base in bfloat16, computed in bfloat16. On a CPU, the weight of
  every linear layer held in bfloat16 and computed in float32 like ``int8`` and ``nf4`` below (measured on this
  project's AVX2 CPU, which has no bfloat16 instructions: a bfloat16 matrix product, forward and backward, is about
  140 times slower than a float32 one; converting the weight to float32 for each product costs about 1.3 times
  one float32 product). The weights take the same memory either way; the activations are float32 on a CPU;
- ``int8``: the weight of every linear layer of the base in int8, one float32 scale per output row (absmax,
  symmetric): torchao's weight-only int8 (``quantize_`` with ``Int8WeightOnlyConfig``, the format PEFT's torchao
  support trains over). Its linear runs above autograd, which then keeps the dequantized float32 copy of every weight
  for the backward pass (measured: training over it took about as much memory as over float32), so the module runs
  it inside :class:`FrozenHeldLinear`, which keeps the int8 weight instead and dequantizes it again for the
  backward pass, as torchao's NF4 linear does (torchao's ``Int8QuantizedTrainingLinearWeight`` does that too, but
  also computes the weight's gradient, measured 1.4 times slower, and fails on some non-contiguous gradients);
- ``nf4``: the weight of every linear layer in 4-bit NormalFloat, blocks of 64 with double-quantized scales
  (torchao's ``NF4Tensor``, what torchtune's QLoRA uses).

For ``int8``, ``nf4`` and ``bfloat16`` on a CPU everything else (embeddings, norms, biases, the output head) stays in
float32, and so does the computation: a held weight is converted to float32 for each product, in the forward and the
backward pass. The output heads (``lm_head``, ``classifier``, ``score``, ... and a new task head) are never held in a
lower precision, as in QLoRA.

The held weights stay inside the model's own ``nn.Linear`` modules (quantized ones as tensor subclasses with the
weight's shape), so every kind's runtime finds the modules it knows; :func:`dense` gives a weight's value back (DoRA's
norm, ``full``'s starting copy). The adapter's tensors stay float32 over any precision (attach with
``dtype=float32``); the runtimes compute the adapter in its own dtype and hand the module's output back in the base's.

The adapter belongs to the full-precision base it was trained over: the manifest records the checkpoint folder's
fingerprints (a base held in a lower precision no longer gives its weights back, so attach checks it against the
folder) and the precision in ``training.base_precision``.
"""

from __future__ import annotations

import functools
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


def native_bfloat16(device="cpu") -> bool:
    """Whether ``bfloat16`` computes in bfloat16 on ``device`` (a GPU) rather than holding the linear weights in
    bfloat16 and computing in float32 (a CPU: see the module's notes)."""
    import torch

    return torch.device(device).type != "cpu"


def holds_linear_weights(precision: str, device="cpu") -> bool:
    """Whether at ``precision`` on ``device`` the linear weights are held apart from the computation, converted to
    float32 for each product: ``int8``, ``nf4``, and ``bfloat16`` on a CPU."""
    return check(precision) in QUANTIZED or (precision == "bfloat16" and not native_bfloat16(device))


def compute_dtype(precision: str, device="cpu"):
    """The dtype the base computes in (and holds its other tensors in) at ``precision`` on ``device``."""
    import torch

    return torch.bfloat16 if check(precision) == "bfloat16" and native_bfloat16(device) else torch.float32


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


def held_weight(weight, precision: str):
    """A frozen weight matrix as :func:`hold` keeps it: in bfloat16, or quantized (:func:`quantize_weight`)."""
    import torch

    return weight.detach().to(torch.bfloat16) if precision == "bfloat16" else quantize_weight(weight, precision)


def quantizable(name: str, module, keep: Iterable[str] = ()) -> bool:
    """Whether :func:`hold` quantizes module ``name``: a ``nn.Linear`` with a plain 2-D weight, outside ``keep``
    (new task heads) and the output heads."""
    import torch

    from adapterkit.targets import outside

    return (isinstance(module, torch.nn.Linear) and outside(name, list(keep))
            and HEAD_SEGMENTS.isdisjoint(name.split(".")) and isinstance(module.weight, torch.Tensor)
            and module.weight.ndim == 2 and module.weight.is_floating_point() and not is_quantized(module.weight))


def hold(model, precision: str, keep: Iterable[str] = (), device="cpu") -> dict[str, int]:
    """Put the base ``model`` (frozen) in ``precision`` for computing on ``device``, in place, module by module:
    ``bfloat16`` on a GPU converts every floating-point parameter; ``int8``, ``nf4`` and ``bfloat16`` on a CPU hold
    the weight of every linear layer :func:`quantizable` allows (modules under ``keep`` are left alone). Returns
    ``{"quantized": n, "kept": n}``, the linear layers held in the precision and those left in float32 (a shape the
    format cannot hold)."""
    import torch

    check(precision)
    counts = {"quantized": 0, "kept": 0}
    if precision == "float32":
        return counts
    if not holds_linear_weights(precision, device):  # bfloat16 on a GPU
        for parameter in model.parameters():
            if parameter.is_floating_point() and not is_quantized(parameter):
                parameter.data = parameter.data.to(torch.bfloat16)
        release_freed_memory()
        return counts
    map_large_blocks()
    for name, module in list(model.named_modules()):
        if not quantizable(name, module, keep):
            continue
        held = held_weight(module.weight, precision)
        if held is None:
            counts["kept"] += 1
            log.info("%s stays in float32: %s cannot hold a weight of shape %s", name, precision,
                     list(module.weight.shape))
            continue
        module.weight = torch.nn.Parameter(held, requires_grad=False)
        # same module, same state (see FrozenHeldLinear); an NF4Tensor runs torchao's own linear, which keeps it
        if precision != "nf4" and type(module) is torch.nn.Linear:
            module.__class__ = frozen_linear_class()
        counts["quantized"] += 1
    release_freed_memory()
    log.info("base held in %s: %d linear layers converted, %d kept in float32", precision, counts["quantized"],
             counts["kept"])
    return counts


#: glibc's ``mallopt`` parameter for the size from which malloc serves a block by a mapping of its own, and ours
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 1 << 20


def _libc(function: str):
    """``function`` of this process's C library (glibc's malloc tuning), or None where it has none."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), function)
    except (OSError, AttributeError):
        log.debug("no %s in this C library: the allocator keeps its defaults", function)
        return None


def release_freed_memory() -> None:
    """Hand memory the allocator holds free back to the operating system (``malloc_trim(0)``): glibc's malloc keeps
    freed blocks below its mmap threshold (up to 32 MB) for reuse, so the float32 originals freed by :func:`hold`
    would stay in the process's resident set. Best-effort: only where the C library has ``malloc_trim`` (glibc)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


@functools.cache
def map_large_blocks() -> None:
    """Have malloc serve every block of 1 MiB or more by a mapping of its own, handed back when freed (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``; by default the threshold climbs to 32 MB as such blocks are freed, and then they
    come from the heap). A base held in a lower precision is converted to float32 for each product, in the forward
    and the backward pass: those temporaries, between the activations and gradients that stay, fragment the heap,
    which keeps growing (measured: LoRA over a 1.1B Llama in nf4 with gradient checkpointing peaked at 0.94 times
    the float32 base's peak). Process-wide, once; best-effort, as :func:`release_freed_memory`."""
    mallopt = _libc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def own_storage(model) -> None:
    """Give every parameter of ``model`` not held quantized a copy of its own. transformers loads a checkpoint's
    tensors as views of the file mapped into memory (safetensors): the tensors left as loaded keep the whole mapping
    alive, and with it every page :func:`hold` read while converting the weights, resident in the process (measured:
    a 335M-parameter float32 checkpoint held in nf4 kept its 1.2 GB file resident)."""
    for parameter in model.parameters():
        if not is_quantized(parameter):
            parameter.data = parameter.data.clone()


_CLASSES: dict[str, type] = {}


def _operand(weight, dtype):
    """A held weight as a linear's operand: an int8 one as it is (torchao's own linear), a bfloat16 one in ``dtype``."""
    return weight if is_quantized(weight) or weight.dtype == dtype else weight.to(dtype)


def frozen_linear_class() -> type:
    """``FrozenHeldLinear``: an ``nn.Linear`` whose frozen weight is held in int8 (torchao's ``Int8Tensor``) or
    bfloat16 while it computes in float32. Its forward runs the linear inside an autograd function that keeps the
    held weight for the backward pass, where it is converted again to give the input its gradient (the frozen weight
    gets none), instead of the float32 copy autograd would keep. Still an ``nn.Linear``: every kind finds it as it
    found the module. Made on first use (it needs torch)."""
    if "held" not in _CLASSES:
        import torch
        import torch.nn.functional as F

        class FrozenHeldWeight(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, bias):
                ctx.save_for_backward(weight)
                return F.linear(x, _operand(weight, x.dtype), bias)  # autograd is off in here

            @staticmethod
            def backward(ctx, grad):
                (weight,) = ctx.saved_tensors
                grad_x = grad @ dense(weight, grad.dtype) if ctx.needs_input_grad[0] else None
                grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
                return grad_x, None, grad_bias

        class FrozenHeldLinear(torch.nn.Linear):
            __doc__ = frozen_linear_class.__doc__

            def forward(self, x):
                weight = self.weight  # a trainable tensor where a full adapter replaces it (then it trains as usual)
                if (torch.is_grad_enabled() and not weight.requires_grad
                        and (is_quantized(weight) or weight.dtype != x.dtype)):
                    return FrozenHeldWeight.apply(x, weight, self.bias)
                return F.linear(x, _operand(weight, x.dtype), self.bias)

        _CLASSES["held"] = FrozenHeldLinear
    return _CLASSES["held"]


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
