"""llama.cpp's GGUF LoRA adapters (``llama-cli --lora a.gguf``, ``Llama(lora_path=...)``) to adapterkit and back.

A GGUF LoRA, as llama.cpp reads it (``src/llama-adapter.cpp``):

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture`` equal to the base's,
  ``adapter.lora.alpha`` (float32; absent or 0 reads as "no scale": ΔW = B·A);
- per adapted base tensor ``<base tensor>.lora_a`` and ``.lora_b``, e.g. ``blk.3.attn_q.weight.lora_a``: A [r, in]
  and B [out, r] in numpy (PyTorch) order; the token embedding's pair is laid out the other way round:
  ``token_embd.weight.lora_a`` is Aᵀ [vocab, r] and ``.lora_b`` is B [dim, r];
- the scale of each pair is α/r with r read from its tensors: one α for the file. Per-target alpha, rank patterns,
  rsLoRA and the component weight are folded into B (:func:`adapterkit.kinds.lora.uniform_alpha`), so ΔW is exact.

The base decides the names and the row order: llama.cpp's own ``convert_hf_to_gguf.py`` permutes the rows of the
query and key weights of Llama-architecture models for its RoPE layout, so B of ``attn_q`` / ``attn_k`` is permuted
the same way when writing (and back when reading). Names come from the ``gguf`` package's tensor map for the base's
architecture. Supported bases (:data:`ARCHITECTURES`): Llama and Mistral (llama.cpp's ``llama``, permuted q/k),
Qwen2, Qwen3, Gemma and Phi-3 (no permutation; Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are llama.cpp's
``attn_qkv`` and ``ffn_up``); other bases are refused. A base whose output head shares the embedding
(``tie_word_embeddings``) has no separate ``output`` tensor, and llama.cpp would apply an embedding LoRA to the tied
head as well (and abort): neither ``lm_head`` nor the embedding is converted there.

Only LoRA exists in llama.cpp: prefix tuning, BitFit, bottleneck adapters, (IA)³, DoRA and whole-tensor (``full``)
components are refused, one line saying so. Reading needs the base too (names, q/k rows, fingerprint). Norm tensors
that some tools put in a GGUF LoRA (``*_norm.weight``) are skipped with a warning, as llama.cpp skips them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from adapterkit.adapter import Adapter, tensor_name
from adapterkit.errors import AdapterError, FormatError, RequestError
from adapterkit.fingerprints import check_base, record_base
from adapterkit.io.outputs import write_file_atomically
from adapterkit.io.paths import open_regular
from adapterkit.kinds.lora import uniform_alpha
from adapterkit.kinds.lora.peft import folded
from adapterkit.manifest import BaseModel, Component, Manifest

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
#: metadata keys, as llama.cpp's src/llama-arch.cpp spells them
GENERAL_TYPE, GENERAL_ARCHITECTURE = "general.type", "general.architecture"
ADAPTER_TYPE, LORA_ALPHA, ALORA_TOKENS = "adapter.type", "adapter.lora.alpha", "adapter.alora.invocation_tokens"


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp holds one Hugging Face architecture."""

    name: str  #: llama.cpp's ``general.architecture``
    permutes_qk: bool  #: whether its converter permutes the rows of q_proj / k_proj (RoPE layout)


#: Hugging Face architecture (config.json ``architectures[0]``) -> llama.cpp's, as its convert_hf_to_gguf.py maps them
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", True),
    "MistralForCausalLM": Architecture("llama", True),
    "Qwen2ForCausalLM": Architecture("qwen2", False),
    "Qwen3ForCausalLM": Architecture("qwen3", False),
    "GemmaForCausalLM": Architecture("gemma", False),
    "Phi3ForCausalLM": Architecture("phi3", False),
}
#: the llama.cpp tensors a LoRA may adapt (``blk.N.`` left out): linear layers, the embedding and the output head
ADAPTABLE = {"token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "ffn_gate", "ffn_up",
             "ffn_down"}
EMBEDDING = "token_embd"
#: why llama.cpp cannot hold a component of each other kind
NOT_IN_LLAMA_CPP = {
    "prefix": "prefix tuning (llama.cpp has no prefix key/value slots)",
    "bitfit": "bias deltas (BitFit)",
    "adapter": "a bottleneck adapter",
    "ia3": "(IA)³ rescaling",
    "dora": "DoRA (its magnitude normalisation)",
    "full": "whole replaced tensors",
}


def require_gguf():
    """The ``gguf`` package (llama.cpp's GGUF reader and writer), or an AdapterError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise AdapterError("the gguf package is not installed: pip install 'adapterkit[gguf]' (or pip install gguf)") \
            from None
    return gguf


def detect(path) -> bool:
    """A regular file that starts with GGUF's magic bytes (a base model GGUF too: reading says it is no adapter)."""
    if not os.path.isfile(path):
        return False
    try:
        with open_regular(path) as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except (AdapterError, OSError):
        return False


# ---------------------------------------------------------------- the base


class GGUFBase:
    """What a base model folder says about its llama.cpp tensors: names of the modules a LoRA may adapt, q/k heads."""

    def __init__(self, base):
        import torch

        from adapterkit.targets import base_config, skeleton

        gguf = require_gguf()
        config = base_config(base)
        hf_architecture = (config.architectures or ["(none)"])[0]
        if hf_architecture not in ARCHITECTURES:
            raise RequestError(f"llama.cpp LoRA conversion knows {', '.join(ARCHITECTURES)} bases; this base is "
                               f"{hf_architecture}", base)
        self.architecture = ARCHITECTURES[hf_architecture]
        self.n_head = int(config.num_attention_heads)
        self.n_kv_head = int(getattr(config, "num_key_value_heads", None) or self.n_head)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        model = skeleton(base)
        arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[self.architecture.name]
        tensor_map = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
        self.modules = {}  #: module path -> module, for those llama.cpp adapts
        self.names = {}  #: module path -> llama.cpp tensor name (without ``.weight``)
        self.order = {}
        for index, (path, module) in enumerate(model.named_modules()):
            self.order[path] = index
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            name = tensor_map.get_name(path)
            if name is not None and name.rpartition(".")[2] in ADAPTABLE:
                self.modules[path], self.names[path] = module, name
        self.paths = {name: path for path, name in self.names.items()}
        by_identity = {id(module): path for path, module in model.named_modules()}
        #: the input embedding and the output head (tied or not)
        self.ends = {by_identity.get(id(model.get_input_embeddings())),
                     by_identity.get(id(model.get_output_embeddings()))}
        self.all_modules = dict(model.named_modules())

    @staticmethod
    def kind(name: str) -> str:
        """``attn_q`` for ``blk.3.attn_q``."""
        return name.rpartition(".")[2]

    def heads(self, name: str) -> int | None:
        """The heads whose rows llama.cpp permutes in this tensor (None: not permuted)."""
        if not self.architecture.permutes_qk:
            return None
        return {"attn_q": self.n_head, "attn_k": self.n_kv_head}.get(self.kind(name))

    def place(self, target: str, component: Component) -> tuple[str, object]:
        """The llama.cpp tensor name (without ``.weight``) and the module of one target, or a one-line refusal."""
        import torch

        from adapterkit.targets import resolve_module

        path = resolve_module(target, self.all_modules)
        if path is None:
            raise RequestError(f"target {target!r} is not a module of the base")
        module = self.all_modules[path]
        if self.tied and path in self.ends:
            raise RequestError(f"target {target!r}: this base ties its output head to the embedding, so llama.cpp "
                               "has no separate tensor for it (and applies an embedding LoRA to the head too)")
        if path not in self.names:
            raise RequestError(f"target {target!r} ({type(module).__name__}) has no tensor llama.cpp adapts with "
                               f"LoRA on a {self.architecture.name} model")
        name = self.names[path]
        is_embedding = isinstance(module, torch.nn.Embedding)
        if is_embedding and type(module) is not torch.nn.Embedding:
            raise RequestError(f"target {target!r}: {type(module).__name__} scales its output inside the module, "
                               "so its LoRA acts differently in llama.cpp (added before the scale)")
        if bool(component.param(target, "fan_in_fan_out", False)) != is_embedding:
            raise RequestError(f"target {target!r}: fan_in_fan_out={component.param(target, 'fan_in_fan_out')} "
                               f"does not match the base's {type(module).__name__}")
        return name, module


def _features(module) -> tuple[int, int]:
    """(in, out) of a Linear, (vocab, dim) of an Embedding."""
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def permute(b: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's RoPE row order applied to B's rows (as convert_hf_to_gguf.py permutes q/k weights): in each head,
    the first-half rows and second-half rows interleave."""
    rows, rank = b.shape
    return b.reshape(heads, 2, rows // heads // 2, rank).swapaxes(1, 2).reshape(rows, rank)


def unpermute(b: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute`."""
    rows, rank = b.shape
    return b.reshape(heads, rows // heads // 2, 2, rank).swapaxes(1, 2).reshape(rows, rank)


def _check_heads(rows: int, heads: int, where: str) -> None:
    if rows % (2 * heads):
        raise RequestError(f"{where}: {rows} rows do not split into {heads} heads of even size")


# ---------------------------------------------------------------- writing


def _lora_component(adapter: Adapter, path) -> Component:
    for component in adapter.components:
        if component.kind != "lora":
            what = NOT_IN_LLAMA_CPP.get(component.kind, f"a {component.kind} component")
            raise RequestError(f"component {component.name!r} is {what}, which llama.cpp's GGUF LoRA cannot represent "
                               "(it holds only LoRA)", path)
    if len(adapter.components) != 1:
        raise RequestError("a GGUF LoRA holds one LoRA: compose the adapter's components into one first "
                           "(adapterkit compose)", path)
    return adapter.components[0]


def write(adapter: Adapter, path, base=None, inputs=(), overwrite: bool = False) -> None:
    """Write ``adapter`` (one LoRA component) as a llama.cpp GGUF LoRA for ``base`` (a Hugging Face model folder, the
    one llama.cpp's base GGUF was converted from), through the output discipline (one file: an existing file is
    replaced whatever ``overwrite`` says, a folder never)."""
    component = _lora_component(adapter, path)
    if base is None:
        raise RequestError("--base is needed: the GGUF tensor names and the q/k row order come from the base model",
                           path)
    gguf = require_gguf()
    try:
        model = GGUFBase(base)
        tensors = adapter.component_tensors(component.name)
        ranks = {target: int(tensors[target]["lora_A"].shape[0]) for target in component.targets}
        alpha, factors = uniform_alpha(component, ranks, component.weight,
                                       round_alpha=lambda value: float(np.float32(value)))
        out = {}
        for target in component.targets:
            name, module = model.place(target, component)
            a, b = tensors[target]["lora_A"], tensors[target]["lora_B"]
            in_features, out_features = _features(module)
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise RequestError(f"target {target!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                                   f"the base's {type(module).__name__} ({in_features} in, {out_features} out)")
            a = a.astype(np.float32)
            b = folded(b, factors[target]).astype(np.float32)
            if model.kind(name) == EMBEDDING:
                a = a.T  # llama.cpp picks rows of lora_a by token id: [vocab, r]
            elif (heads := model.heads(name)) is not None:
                _check_heads(b.shape[0], heads, f"target {target!r}")
                b = permute(b, heads)
            out[f"{name}.weight{SUFFIX_A}"] = np.ascontiguousarray(a)
            out[f"{name}.weight{SUFFIX_B}"] = np.ascontiguousarray(b)
    except AdapterError as exc:
        raise (exc if exc.path else exc.at(path)) from None
    check_base(adapter, base, "the adapter", force=True)  # a warning if it was made for another base

    def write_gguf(temporary: str) -> None:
        writer = gguf.GGUFWriter(temporary, model.architecture.name)
        writer.add_type("adapter")
        writer.add_string(ADAPTER_TYPE, "lora")
        writer.add_float32(LORA_ALPHA, alpha)
        for name, array in out.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomically(path, write_gguf, inputs=[*inputs, base])
    log.info("wrote a GGUF LoRA for llama.cpp's %s (alpha %g, %d targets)", model.architecture.name, alpha,
             len(component.targets))


# ---------------------------------------------------------------- reading


def read(path, base=None) -> Adapter:
    """A llama.cpp GGUF LoRA as an adapter with one LoRA component, its targets the modules of ``base`` (needed)."""
    if base is None:
        raise RequestError("--base is needed: the GGUF tensor names and the q/k row order are resolved against the "
                           "base model", path)
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise FormatError(f"not a readable GGUF file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          path) from None
    try:
        adapter = _read(reader, GGUFBase(base), gguf)
    except AdapterError as exc:
        raise (exc if exc.path else exc.at(path)) from None
    record_base(adapter.manifest.base_model, base)
    try:
        adapter.validate()
    except AdapterError as exc:
        raise exc.at(path) from None
    return adapter


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _array(tensor, gguf) -> np.ndarray:
    """A tensor's values in numpy order: float32 and float16 as stored, other types dequantized to float32."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.array(tensor.data, copy=True).reshape(shape)
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    except (NotImplementedError, ValueError) as exc:
        raise FormatError(f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be read back "
                          f"({exc})") from None


def _read(reader, model: GGUFBase, gguf) -> Adapter:
    general_type = _field(reader, GENERAL_TYPE)
    if general_type != "adapter":
        raise FormatError(f"general.type is {general_type!r}, not 'adapter': a model, not a LoRA adapter")
    adapter_type = _field(reader, ADAPTER_TYPE)
    if adapter_type != "lora":
        raise FormatError(f"adapter.type is {adapter_type!r}: only LoRA adapters ('lora') are read")
    architecture = _field(reader, GENERAL_ARCHITECTURE)
    if architecture != model.architecture.name:
        raise RequestError(f"the adapter is for llama.cpp's {architecture!r} architecture, the base is "
                           f"{model.architecture.name!r}")
    if _field(reader, ALORA_TOKENS) is not None:
        raise FormatError("an activated LoRA (aLoRA, adapter.alora.invocation_tokens) acts only after its "
                          "invocation tokens, which adapterkit cannot represent")
    alpha = _field(reader, LORA_ALPHA)
    alpha = 0.0 if alpha is None else float(alpha)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        name = tensor.name
        for suffix, role in ((SUFFIX_A, "a"), (SUFFIX_B, "b")):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[role] = _array(tensor, gguf)
                break
        else:
            if name.endswith("_norm.weight"):
                log.warning("skipping %s: norm tensors in a LoRA are skipped by llama.cpp too", name)
                continue
            raise FormatError(f"tensor {name!r} is neither a .lora_a nor a .lora_b")
    if not pairs:
        raise FormatError("the GGUF LoRA holds no LoRA tensors")
    held: dict[str, dict[str, np.ndarray]] = {}
    embeddings = set()
    for weight_name in sorted(pairs):
        pair = pairs[weight_name]
        if set(pair) != {"a", "b"}:
            raise FormatError(f"{weight_name} has {'lora_a' if 'a' in pair else 'lora_b'} but not its partner")
        name = weight_name.removesuffix(".weight")
        path = model.paths.get(name) if weight_name.endswith(".weight") else None
        if path is None:
            raise FormatError(f"{weight_name} is not a tensor adapterkit can place on this {model.architecture.name} "
                              "base")
        if model.tied and path in model.ends:
            raise RequestError(f"{weight_name}: this base ties its output head to the embedding, so llama.cpp has no "
                               "separate tensor for it (and applies an embedding LoRA to the head too)")
        a, b = pair["a"], pair["b"]
        in_features, out_features = _features(model.modules[path])
        if model.kind(name) == EMBEDDING:  # lora_a [vocab, r], lora_b [dim, r]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != in_features or b.shape[0] != out_features \
                    or a.shape[1] != b.shape[1]:
                raise FormatError(f"{weight_name}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not fit the "
                                  f"base's embedding ({in_features} tokens, {out_features} wide)")
            a = np.ascontiguousarray(a.T)
            embeddings.add(path)
        else:
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape[0] != out_features \
                    or a.shape[0] != b.shape[1]:
                raise FormatError(f"{weight_name}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not fit the "
                                  f"base's {in_features} in, {out_features} out")
            if (heads := model.heads(name)) is not None:
                _check_heads(b.shape[0], heads, weight_name)
                b = np.ascontiguousarray(unpermute(b, heads))
        held[path] = {"lora_A": a, "lora_B": b}
    targets = sorted(held, key=model.order.__getitem__)
    ranks = {target: int(held[target]["lora_A"].shape[0]) for target in targets}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # llama.cpp's scale: alpha/r per tensor, or 1 when alpha is 0 (alpha = r on each target)
    params = {"rank": rank, "alpha": _number(alpha if alpha else rank), "scaling": "standard",
              "fan_in_fan_out": False}
    target_params = {}
    for target in targets:
        override = {}
        if ranks[target] != rank:
            override["rank"] = ranks[target]
            if not alpha:
                override["alpha"] = ranks[target]
        if target in embeddings:
            override["fan_in_fan_out"] = True  # an embedding's ΔW is (B·A)ᵀ
        if override:
            target_params[target] = override
    component = Component("lora", "lora", targets, params, target_params)
    return Adapter(Manifest([component], BaseModel()),
                   {tensor_name(component.name, t, role): x for t, roles in held.items() for role, x in roles.items()})


def _number(value: float):
    return int(value) if float(value).is_integer() else float(value)
