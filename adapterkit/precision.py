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

For ``int8``, ``nf4`` and ``bfloat16`` on a CPU the embeddings and the pretrained output heads (``lm_head``,
``embed_out``, ...) are held in bfloat16, never quantized, as QLoRA keeps them (in its compute dtype); a new task head
(trained, ``keep``) stays float32, and so do norms and biases. The computation is float32: a held weight is converted
for each product, in the forward and the backward pass, a block of rows at a time (at most :data:`CONVERT_BYTES` of
float32 each), so that no float32 copy of a large weight exists at once (an output head over a 32,000-token vocabulary
is 262 MB in float32; torchao's NF4 dequantization takes about 4.8 times its float32 result while it runs).

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
#: name segments of output heads, never quantized: a pretrained one is held in bfloat16, a new one stays float32
HEAD_SEGMENTS = frozenset({"lm_head", "embed_out", "classifier", "score", "qa_outputs", "pre_classifier", "cls",
                           "vocab_projector", "vocab_transform"})
#: the most bytes of float32 a held weight is converted to at once for a product (see the module's notes)
CONVERT_BYTES = 16 << 20
#: the attribute that marks a parameter held in bfloat16 while the model computes in float32
HELD = "_adapterkit_held"


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


def is_held(tensor) -> bool:
    """Whether ``tensor`` is a base weight held apart from the computation, quantized or in bfloat16 (:func:`hold`):
    products with it run in float32."""
    return is_quantized(tensor) or getattr(tensor, HELD, False)


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


def held_form(name: str, module, keep: Iterable[str] = ()) -> str | None:
    """How :func:`hold` keeps the weight of module ``name``: ``"quantized"`` (a linear layer of the body: in the
    precision), ``"bfloat16"`` (an embedding, or a pretrained output head: :data:`HEAD_SEGMENTS`), or None (left as
    it is: a module under ``keep``, the new task heads; another type; a weight already held)."""
    import torch

    from adapterkit.targets import outside

    weight = getattr(module, "weight", None)
    if (not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or not outside(name, list(keep))
            or not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point()
            or is_held(weight)):
        return None
    if isinstance(module, torch.nn.Embedding) or not HEAD_SEGMENTS.isdisjoint(name.split(".")):
        return "bfloat16"
    return "quantized"


def hold(model, precision: str, keep: Iterable[str] = (), device="cpu") -> dict[str, int]:
    """Put the base ``model`` (frozen) in ``precision`` for computing on ``device``, in place, module by module:
    ``bfloat16`` on a GPU converts every floating-point parameter; ``int8``, ``nf4`` and ``bfloat16`` on a CPU hold
    the weight of every linear layer in the precision and the embeddings and pretrained output heads in bfloat16
    (:func:`held_form`; modules under ``keep`` are left alone). Returns ``{"quantized": n, "bfloat16": n, "kept": n}``:
    the linear layers held in the precision, the embeddings and heads held in bfloat16, and the linear layers left
    in float32 (a shape the format cannot hold). A weight tied to another module's (a head that is its embedding)
    stays one parameter."""
    import torch

    check(precision)
    counts = {"quantized": 0, "bfloat16": 0, "kept": 0}
    if precision == "float32":
        return counts
    if not holds_linear_weights(precision, device):  # bfloat16 on a GPU
        for parameter in model.parameters():
            if parameter.is_floating_point() and not is_quantized(parameter):
                parameter.data = parameter.data.to(torch.bfloat16)
        release_freed_memory()
        return counts
    map_large_blocks()
    files = MappedFiles()
    held: dict[int, torch.nn.Parameter] = {}  # id of a parameter as loaded -> the one held in its place
    for name, module in list(model.named_modules()):
        form = held_form(name, module, keep)
        if form is None:
            continue
        original = module.weight
        if id(original) not in held:
            value = held_weight(original, precision if form == "quantized" else "bfloat16")
            if value is None:
                counts["kept"] += 1
                log.info("%s stays in float32: %s cannot hold a weight of shape %s", name, precision,
                         list(original.shape))
                continue
            held[id(original)] = parameter = torch.nn.Parameter(value, requires_grad=False)
            setattr(parameter, HELD, True)
            counts[form] += 1
            files.release(original)
        module.weight = held[id(original)]
        module.__class__ = held_module_class(type(module))
    release_freed_memory()
    log.info("base held in %s: %d linear layers converted, %d embeddings and heads in bfloat16, %d kept in float32",
             precision, counts["quantized"], counts["bfloat16"], counts["kept"])
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


#: ``madvise``'s advice that the pages of a range are not needed: a file's pages are read again from it if touched
MADV_DONTNEED = 4


class MappedFiles:
    """The checkpoint files mapped into this process (``/proc/self/maps``: mappings of ``*.safetensors`` files), whose
    pages a converted weight no longer needs. transformers loads a safetensors checkpoint's tensors as views of the
    file mapped into memory; converting every weight reads the whole file, and each page read stays in the process's
    resident set until the mapping goes, so holding a base peaked at the float32 file's size plus the held weights.
    :meth:`release` drops the pages of one converted weight instead (``madvise(MADV_DONTNEED)``: the mapping is of a
    file, so a page touched again is read again from it; nothing is lost). Best-effort: nothing where there is no
    ``/proc`` or no ``madvise``."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []
        self.madvise = _libc("madvise")
        try:
            with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].rstrip("\n").endswith(".safetensors"):
                        start, end = (int(address, 16) for address in fields[0].split("-"))
                        self.ranges.append((start, end))
        except OSError:
            log.debug("no /proc/self/maps: a converted weight's file pages stay resident until the file is unmapped")

    def release(self, tensor) -> None:
        """Drop the whole pages of a mapped file that ``tensor``'s bytes span from the resident set (none where the
        tensor is not a view of a mapped file)."""
        import ctypes
        import mmap

        if not self.ranges or self.madvise is None or not tensor.is_contiguous():
            return
        first = tensor.data_ptr()
        last = first + tensor.numel() * tensor.element_size()
        if not any(start <= first and last <= end for start, end in self.ranges):
            return
        page = mmap.PAGESIZE
        start, end = -(-first // page) * page, last // page * page  # the pages wholly inside the tensor's bytes
        if end > start:
            self.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def own_storage(model) -> None:
    """Give every parameter of ``model`` not held quantized a copy of its own. transformers loads a checkpoint's
    tensors as views of the file mapped into memory (safetensors): the tensors left as loaded keep the whole mapping
    alive, and with it every page :func:`hold` read while converting the weights, resident in the process (measured:
    a 335M-parameter float32 checkpoint held in nf4 kept its 1.2 GB file resident)."""
    for parameter in model.parameters():
        if not is_quantized(parameter):
            parameter.data = parameter.data.clone()


def _row_blocks(weight) -> list[tuple[int, object]]:
    """``weight`` as (first row, block of rows) pairs whose float32 copies take at most :data:`CONVERT_BYTES` each: a
    plain or int8 weight sliced, an NF4 one split by torchao into equal blocks whose packed values and scales divide
    evenly (one block where the weight is smaller, or where no such split exists)."""
    import math

    rows, columns = weight.shape
    count = math.ceil(rows * columns * 4 / CONVERT_BYTES)
    if count <= 1:
        return [(0, weight)]
    if isinstance(weight, _torchao().NF4Tensor):
        sizes = [rows, *(getattr(weight, inner).numel()
                         for inner in ("quantized_data", "quantized_scalers", "quantization_factor"))]
        count = next((n for n in range(count, min(rows, 8 * count) + 1) if all(size % n == 0 for size in sizes)), 1)
        size = rows // count
        return [(i * size, block) for i, block in enumerate(weight.split(size))] if count > 1 else [(0, weight)]
    size = math.ceil(rows / count)
    return [(start, weight[start:start + size]) for start in range(0, rows, size)]


def held_product(x, weight):
    """``x Wᵀ`` for a held weight ``W``, in ``x``'s dtype, converting ``W`` a block of rows at a time."""
    import torch.nn.functional as F

    blocks = _row_blocks(weight)
    if len(blocks) == 1:
        return F.linear(x, dense(weight, x.dtype))
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start, block in blocks:
        out[..., start:start + block.shape[0]] = F.linear(x, dense(block, x.dtype))
    return out


def held_input_gradient(grad, weight):
    """The gradient of ``x Wᵀ`` with respect to ``x``, ``grad · W``, for a held weight ``W``, a block at a time."""
    total = None
    for start, block in _row_blocks(weight):
        part = grad[..., start:start + block.shape[0]] @ dense(block, grad.dtype)
        total = part if total is None else total.add_(part)
    return total


_CLASSES: dict[type, type] = {}


def held_module_class(base: type) -> type:
    """The class a module of class ``base`` takes once :func:`hold` holds its weight: ``FrozenHeldLinear`` for an
    ``nn.Linear``; for an embedding, one that gives its looked-up rows in float32 (``FloatRowsEmbedding``; a
    subclass's own forward, such as Gemma's scaling, runs on those float32 rows); ``base`` itself otherwise (a linear
    layer of another class keeps its own forward: torchao's tensors run it). Made on first use (needs torch)."""
    import torch

    if base not in _CLASSES:
        if base is torch.nn.Linear:
            _CLASSES[base] = _frozen_linear_class()
        elif base is torch.nn.Embedding:
            _CLASSES[base] = _float_rows_embedding()
        elif issubclass(base, torch.nn.Embedding):  # its forward's super() reaches FloatRowsEmbedding's
            _CLASSES[base] = type(f"Held{base.__name__}", (base, _float_rows_embedding()), {})
        else:
            _CLASSES[base] = base
    return _CLASSES[base]


@functools.cache
def _float_rows_embedding() -> type:
    """``FloatRowsEmbedding``: an ``nn.Embedding`` whose table is held in bfloat16; it looks rows up in bfloat16 and
    gives them in float32, the dtype the held model computes in. The table is frozen; a trainable one in its place
    (``full``) computes as usual."""
    import torch

    class FloatRowsEmbedding(torch.nn.Embedding):
        __doc__ = _float_rows_embedding.__doc__

        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs).to(torch.float32)

    return FloatRowsEmbedding


def _frozen_linear_class() -> type:
    """``FrozenHeldLinear``: an ``nn.Linear`` whose frozen weight is held (int8, NF4 or bfloat16) while it computes in
    float32, a block of rows at a time (:func:`held_product`). With autograd on, its forward runs inside an autograd
    function that keeps the held weight for the backward pass, where it is converted again to give the input its
    gradient (the frozen weight gets none), instead of the float32 copy autograd would keep. Still an
    ``nn.Linear``: every kind finds it as it found the module."""
    import torch
    import torch.nn.functional as F

    class FrozenHeldWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(weight)
            y = held_product(x, weight)  # autograd is off in here
            return y if bias is None else y.add_(bias)

        @staticmethod
        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            grad_x = held_input_gradient(grad, weight) if ctx.needs_input_grad[0] else None
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
            return grad_x, None, grad_bias

    class FrozenHeldLinear(torch.nn.Linear):
        __doc__ = _frozen_linear_class.__doc__

        def forward(self, x):
            weight = self.weight  # a trainable tensor where a full adapter replaces it (then it trains as usual)
            if weight.requires_grad or not is_held(weight):
                return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype), self.bias)
            if torch.is_grad_enabled():
                return FrozenHeldWeight.apply(x, weight, self.bias)
            y = held_product(x, weight)
            return y if self.bias is None else y.add_(self.bias)

    return FrozenHeldLinear


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
