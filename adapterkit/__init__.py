"""adapterkit: a versioned on-disk format for parameter-efficient fine-tuning adapters, and the tools around it.

The names below are imported on first use (PEP 562), so that ``import adapterkit`` (and ``adapterkit --help``) does
not pay for importing torch.
"""

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "Adapter": "adapterkit.adapter",
    "AdapterError": "adapterkit.errors",
    "BaseModel": "adapterkit.manifest",
    "Component": "adapterkit.manifest",
    "Manifest": "adapterkit.manifest",
    "fingerprint": "adapterkit.fingerprints",
    "load": "adapterkit.io.adapter_file",
    "save": "adapterkit.io.adapter_file",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
