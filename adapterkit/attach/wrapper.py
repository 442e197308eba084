"""The common shape of the modules that attach swaps in: the original module kept whole as ``base``, the adapter's
parameters beside it. Detach puts ``base`` back where the wrapper stood, so the model gets its own objects back."""

from __future__ import annotations

from typing import Iterator

import torch


class AdapterWrapper(torch.nn.Module):
    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base

    def __getattr__(self, name: str):
        # Code around the module still reads its attributes (``weight``, ``in_features``, ...): find them on base.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def adapter_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The parameters this wrapper added (not those of ``base``), with their names relative to the wrapper."""
        for name, parameter in self.named_parameters():
            if not name.startswith("base."):
                yield name, parameter


def innermost(module: torch.nn.Module) -> torch.nn.Module:
    """The original module under any wrappers (attaching twice wraps a wrapper)."""
    while isinstance(module, AdapterWrapper):
        module = module.base
    return module
