"""Run an exported folder in ONNX Runtime, switching adapters per call without re-creating the session.

    runner = Runner("onnx/")                       # CUDA when onnxruntime-gpu sees a GPU, else CPU
    runner.provider                                # the provider that really runs (ORT falls back silently)
    runner.run({"input_ids": ids, "attention_mask": mask}, adapter="support")["logits"]
    runner.run(inputs)                             # no adapter: the base model

On CPU an adapter is activated per call with ``RunOptions.add_active_adapter`` (ONNX Runtime feeds its tensors as the
graph inputs of the same names). ONNX Runtime ignores active adapters under IO binding, which is what keeps tensors on
the GPU, so on CUDA :class:`_CudaBinding` binds each adapter's tensors itself from device copies made once per adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from adapterkit.errors import AdapterError
from adapterkit.onnx.adapter_files import read_onnx_adapter
from adapterkit.onnx.export import DESCRIPTION

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (``onnxruntime-gpu``), then CPU."""
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


class Runner:
    """One InferenceSession over an exported folder, and its adapters loaded once."""

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None):
        self.folder = Path(folder)
        try:
            self.description = json.loads((self.folder / DESCRIPTION).read_text())
        except (OSError, ValueError) as exc:
            raise AdapterError(f"not an adapterkit ONNX export ({DESCRIPTION} unreadable: {exc})", folder) from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT warns for every overridable initializer: that layout is intended here
        self.session = ort.InferenceSession(os.fspath(self.folder / self.description["model"]), options,
                                            providers=providers or default_providers())
        #: the provider that runs the graph (ORT falls back to CPU without an error when CUDA is not usable)
        self.provider = self.session.get_providers()[0]
        self.output_names = [o["name"] for o in self.description["outputs"]]
        self.adapter_files = {a["name"]: self.folder / a["file"] for a in self.description["adapters"] if "file" in a}
        self._cuda = _CudaBinding(self.session, self.adapter_files) if self.provider == CUDA else None
        self._loaded = {} if self._cuda else {name: _load(path) for name, path in self.adapter_files.items()}

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_files)

    def run(self, inputs: dict[str, np.ndarray], adapter: str | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs for ``inputs`` (numpy arrays by input name) with ``adapter`` active (None: base)."""
        if adapter is not None and adapter not in self.adapter_files:
            known = ", ".join(self.adapter_files) or "none: this export is merged"
            raise AdapterError(f"no adapter {adapter!r} in this export (adapters: {known})", self.folder)
        if self._cuda is not None:
            return dict(zip(self.output_names, self._cuda.run(inputs, adapter, self.output_names)))
        options = ort.RunOptions()
        if adapter is not None:
            options.add_active_adapter(self._loaded[adapter])
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs, options)))


def _load(path: Path) -> ort.LoraAdapter:
    adapter = ort.LoraAdapter()
    adapter.Load(os.fspath(path))
    return adapter


class _CudaBinding:
    """The CUDA path (not tested here, no GPU): IO binding with each adapter's tensors kept as device OrtValues."""

    def __init__(self, session: ort.InferenceSession, adapter_files: dict[str, Path]):
        self.session = session
        self.device_tensors = {
            name: {slot: ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                   for slot, array in read_onnx_adapter(path).items()}
            for name, path in adapter_files.items()
        }

    def run(self, inputs: dict[str, np.ndarray], adapter: str | None, output_names: list[str]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
        for name, value in self.device_tensors.get(adapter, {}).items():  # unbound slots keep their defaults: base
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
