"""Targets in one place: how an adapter's target names meet a model's modules.

- :func:`resolve_module`: the model module a target names, also across a wrapper prefix (``model.``, ``bert.``).
- :func:`attention_modules`: the modules whose forward calls transformers' attention function — the modules a prefix
  is read by (``LlamaAttention``, ``GPT2Attention``, ``BertSelfAttention``; not ``BertAttention``, which only holds
  one of them).
- :func:`skeleton`: a base model's module tree built from its ``config.json`` on the meta device (no weights read).
- Structural finders the kinds' default targets use: :func:`projections` (an attention module's query/key/value/output
  projections, fused or not), :func:`linear_modules`, :func:`outside`.

Everything but :func:`resolve_module` needs torch and transformers, imported on first use.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Iterable, Sequence

from adapterkit.errors import FormatError, RequestError

#: names under which transformers modeling files call the attention function
ATTENTION_CALLS = ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
#: child names of an attention module, per projection (separate q/k/v/o, or fused qkv)
PROJECTION_NAMES = {
    "query": ("q_proj", "query", "q", "q_lin", "wq"),
    "key": ("k_proj", "key", "k", "k_lin", "wk"),
    "value": ("v_proj", "value", "v", "v_lin", "wv"),
    "output": ("o_proj", "out_proj", "dense", "c_proj", "o", "out_lin", "wo"),
    "fused": ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack", "qkv"),
}


def resolve_module(target: str, modules: Iterable[str]) -> str | None:
    """The base module a target names: itself, or, when the adapter was made on a model with (or without) a wrapper
    prefix (``model.layers.0.q_proj`` vs ``layers.0.q_proj``), the unique module that differs by one leading
    segment. ``None`` when nothing matches; a RequestError when several do."""
    modules = modules if isinstance(modules, (set, frozenset, dict)) else set(modules)
    if target in modules:
        return target
    candidates = set()
    _, _, without_head = target.partition(".")
    if without_head in modules:
        candidates.add(without_head)
    depth = target.count(".") + 1
    candidates.update(m for m in modules if m.endswith("." + target) and m.count(".") == depth)
    if len(candidates) > 1:
        raise RequestError(f"target {target!r} is ambiguous in the base: it could be {' or '.join(sorted(candidates))}")
    return candidates.pop() if candidates else None


def outside(name: str, excluded: Sequence[str]) -> bool:
    """Whether module ``name`` lies outside every module of ``excluded`` (a new task head, say)."""
    return not any(name == e or name.startswith(e + ".") for e in excluded)


def calls_attention(module) -> bool:
    """Whether ``module``'s forward calls transformers' attention function (where a prefix can be read)."""
    return _class_calls_attention(type(module))


@functools.cache
def _class_calls_attention(cls) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return any(name in source for name in ATTENTION_CALLS)


def attention_modules(model, excluded: Sequence[str] = ()) -> list[str]:
    """Module paths of the modules that call the attention function, in model order (one per layer, usually)."""
    return [name for name, module in model.named_modules() if calls_attention(module) and outside(name, excluded)]


def attention_layers(model, excluded: Sequence[str] = ()) -> list[str]:
    """The attention modules for finding projections: those that call the attention function, or, in a family that
    computes attention itself (Falcon), the innermost modules whose class name ends in ``Attention``."""
    calling = attention_modules(model, excluded)
    if calling:
        return calling
    named = [name for name, module in model.named_modules()
             if type(module).__name__.endswith("Attention") and outside(name, excluded)]
    return [name for name in named if not any(other.startswith(name + ".") for other in named)]


def projections(model, role: str, excluded: Sequence[str] = ()) -> list[str]:
    """The ``role`` (query, key, value, output or fused) projections of every attention module: its direct children
    named as :data:`PROJECTION_NAMES` says."""
    found = []
    for path in attention_layers(model, excluded):
        for child, module in model.get_submodule(path).named_children():
            if child in PROJECTION_NAMES[role] and isinstance(module, linear_types()):
                found.append(f"{path}.{child}")
    return found


def query_value_projections(model, excluded: Sequence[str] = ()) -> list[str]:
    """PEFT's usual LoRA targets, found from the structure: each attention module's query and value projections, or
    its fused query-key-value projection when that is the layout."""
    separate = projections(model, "query", excluded) + projections(model, "value", excluded)
    if separate:
        return sorted(separate, key=_model_order(model))
    return projections(model, "fused", excluded)


def key_value_projections(model, excluded: Sequence[str] = ()) -> list[str]:
    """Each attention module's key and value projections, or its fused projection (what (IA)³ rescales)."""
    separate = projections(model, "key", excluded) + projections(model, "value", excluded)
    if separate:
        return sorted(separate, key=_model_order(model))
    return projections(model, "fused", excluded)


def _attention_units(model, excluded: Sequence[str]) -> list[tuple[str, str]]:
    """``(attention unit, block)`` per attention module: the unit is the module that calls attention, or its parent
    when that parent is an attention wrapper too (BERT's ``BertAttention`` holds the call and the output projection);
    the block (a transformer layer) is the unit's parent."""
    units = []
    modules = dict(model.named_modules())
    for path in attention_layers(model, excluded):
        parent = path.rpartition(".")[0]
        unit = parent if parent and "Attention" in type(modules[parent]).__name__ else path
        units.append((unit, unit.rpartition(".")[0]))
    return units


def _linears_under(model, path: str) -> list[tuple[str, object]]:
    prefix = f"{path}." if path else ""
    return [(name, module) for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, linear_types())]


def _fan(module) -> tuple[int, int]:
    """(in, out) of a Linear ([out, in] weight) or a Conv1D ([in, out] weight)."""
    rows, columns = module.weight.shape
    return (columns, rows) if hasattr(module, "in_features") else (rows, columns)


def attention_outputs(model, excluded: Sequence[str] = ()) -> list[str]:
    """Each attention unit's output projection (``o_proj``, GPT-2's ``attn.c_proj``, BERT's
    ``attention.output.dense``), after which a bottleneck adapter of Houlsby et al. sits: the linear layer named as
    an output, else the unit's last linear layer that is not a query, key, value or fused projection."""
    inputs = {name for role in ("query", "key", "value", "fused") for name in PROJECTION_NAMES[role]}
    found = []
    for unit, _ in _attention_units(model, excluded):
        linears = [name for name, _ in _linears_under(model, unit) if name.rpartition(".")[2] not in inputs]
        named = [name for name in linears if name.rpartition(".")[2] in PROJECTION_NAMES["output"]]
        if named or linears:
            found.append((named or linears)[-1])
    return found


def feedforward_outputs(model, excluded: Sequence[str] = ()) -> list[str]:
    """Each block's feed-forward output projection: the last linear layer of the block outside its attention unit
    that maps a wider input to a narrower output (Llama's ``mlp.down_proj``, GPT-2's ``mlp.c_proj``, BERT's
    ``output.dense``)."""
    found = []
    for unit, block in _attention_units(model, excluded):
        narrowing = [name for name, module in _linears_under(model, block)
                     if not (name == unit or name.startswith(unit + ".")) and _fan(module)[0] > _fan(module)[1]]
        if narrowing:
            found.append(narrowing[-1])
    return found


def linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def linear_modules(model, excluded: Sequence[str] = ()) -> list[str]:
    """Every Linear or Conv1D module outside ``excluded`` and the output embedding (the LM head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if isinstance(module, linear_types()) and module is not output and outside(name, excluded)]


def _model_order(model):
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda name: order[name]


def base_config(base: str | os.PathLike):
    """The transformers config of a base model folder."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise FormatError(f"not a Hugging Face model folder ({exc})", base) from None


def skeleton(base: str | os.PathLike):
    """The base model's module tree, built from its ``config.json`` on the meta device (no weights read)."""
    import torch
    import transformers

    config = base_config(base)
    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):
        return architecture(config) if architecture is not None else transformers.AutoModel.from_config(config)
