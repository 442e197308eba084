"""adapterkit: a versioned on-disk format for parameter-efficient fine-tuning adapters, and the tools around it."""

__version__ = "0.1.0"

from adapterkit.adapter import Adapter  # noqa: E402
from adapterkit.errors import AdapterError  # noqa: E402
from adapterkit.fileformat import load, save  # noqa: E402
from adapterkit.fingerprint import fingerprint  # noqa: E402
from adapterkit.manifest import BaseModel, Component, Manifest  # noqa: E402

__all__ = ["Adapter", "AdapterError", "BaseModel", "Component", "Manifest", "fingerprint", "load", "save"]
