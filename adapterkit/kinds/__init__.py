"""The registry of adapter kinds: one package per kind, everything that kind does in that package.

A kind package holds

- ``__init__.py``: a :class:`~adapterkit.kinds.base.Kind` subclass (numpy only): the manifest parameters and tensor
  rules, the composition rule, the lines of ``inspect``, the training options;
- ``runtime.py``: a :class:`~adapterkit.kinds.runtime.Runtime` (torch): the forward function that attach and the ONNX
  export both use, the weight math of merge and its inverse, the training initialisation, the default targets;
- ``peft.py`` (when PEFT has the kind): how its tensors and config map to PEFT's files.

Nothing outside a kind's package branches on its name: attach, merge, export, compose, train, ``inspect`` and the
converters ask the registry.

How to add a kind
-----------------
1. Copy the closest package (``bitfit`` is the smallest) to ``adapterkit/kinds/<name>/`` and fill in the three files.
   The docstrings of :class:`~adapterkit.kinds.base.Kind` and :class:`~adapterkit.kinds.runtime.Runtime` say what
   each method must do; the base classes refuse politely what a kind does not support (compose, merge, PEFT).
2. Register it: one line in :data:`REGISTERED` below.
3. Describe it in ``spec/SPEC.md`` (§6: roles, shapes, params, effect), in ``adapterkit/schema/manifest.schema.json``
   (its ``params``), and add conformance vectors to ``spec/make_vectors.py`` (one valid file, one invalid).
4. Run the tests: ``tests/test_kind_contract.py`` runs every registered kind through save/load, attach, detach,
   merge and its inverse, compose, the ONNX graph, PEFT and training on Llama, GPT-2 and BERT.
"""

from __future__ import annotations

import importlib

from adapterkit.errors import FormatError
from adapterkit.kinds.base import Kind

#: every kind ("module:class"), one line each. The order is the one in which kinds act on one module, whatever order
#: they were attached in (spec §6.8): DoRA (its norm is of the weight it finds: the base's), weight updates (LoRA),
#: bias updates, rescaling ((IA)³), then what reads the module's output (bottleneck adapters); composites list their
#: components in it too.
REGISTERED = (
    "adapterkit.kinds.dora:DoRA",
    "adapterkit.kinds.lora:LoRA",
    "adapterkit.kinds.bitfit:BitFit",
    "adapterkit.kinds.ia3:IA3",
    "adapterkit.kinds.prefix:Prefix",
    "adapterkit.kinds.adapter:BottleneckAdapter",
    "adapterkit.kinds.full:Full",
)


def _registry() -> dict[str, Kind]:
    kinds = {}
    for entry in REGISTERED:
        module, _, cls = entry.partition(":")
        kind = getattr(importlib.import_module(module), cls)()
        kinds[kind.name] = kind
    return kinds


KINDS: dict[str, Kind] = _registry()


def get_kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise FormatError(f"unknown adapter kind {name!r} (this adapterkit knows: {', '.join(KINDS)}; "
                          "a newer adapterkit may know it)") from None


def order(kind: str) -> int:
    """Where ``kind`` acts on a module among the kinds acting on it (its place in :data:`REGISTERED`)."""
    return list(KINDS).index(kind)


def trainable_kinds() -> list[str]:
    """The kinds ``train --method`` offers."""
    return [name for name, kind in KINDS.items() if kind.trainable]
