"""Run an exported folder in ONNX Runtime, switching adapters per call without re-creating the session.

    runner = Runner("onnx/")                       # CUDA when onnxruntime-gpu sees a GPU, else CPU
    runner.provider                                # the provider that really runs (ORT falls back silently)
    runner.run({"input_ids": ids, "attention_mask": mask}, adapter="support")["logits"]
    runner.run(inputs)                             # no adapter: the base model
    runner.generate(prompt_ids, adapter="support", max_new_tokens=20)      # greedy (temperature=0.7: sampled)

A graph exported with its key/value cache (``export_onnx(..., cache=True)``) generates one token per step, feeding
the cache it returned; ``run`` on it starts from an empty cache. A plain graph generates by running the whole
sequence again for each token.

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

    @property
    def cache(self) -> dict | None:
        """The key/value cache layout of a cached graph (``layers``, ``kv_heads``, ``head_dim``), else None."""
        return self.description.get("cache")

    def first_step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """A cached graph's inputs for a first step: positions 0..n-1 (as the model numbers tokens itself), an empty
        cache."""
        cache = self.cache
        empty = np.zeros((input_ids.shape[0], cache["kv_heads"], 0, cache["head_dim"]), np.float32)
        past = {f"past_key_values.{layer}.{part}": empty for layer in range(cache["layers"])
                for part in ("key", "value")}
        positions = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions, **past}

    def generate(self, prompt, adapter: str | None = None, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[int]:
        """The tokens that follow ``prompt`` (token ids): the most likely each time (``temperature`` 0), or drawn from
        softmax(logits / temperature) within the ``top_p`` nucleus, with ``seed``."""
        random = np.random.default_rng(seed)
        ids = np.asarray(prompt, dtype=np.int64)[None]
        mask = np.ones_like(ids)
        inputs = self.first_step(ids, mask) if self.cache else {"input_ids": ids, "attention_mask": mask}
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            outputs = self.run(inputs, adapter)
            token = _choose(outputs[self.output_names[0]][0, -1], temperature, top_p, random)
            tokens.append(token)
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            if self.cache:  # one new token, after the cache the step returned
                past = {name.replace("present", "past_key_values", 1): outputs[name] for name in self.output_names[1:]}
                inputs = {"input_ids": np.array([[token]]), "attention_mask": mask,
                          "position_ids": np.array([[mask.shape[1] - 1]]), **past}
            else:
                inputs = {"input_ids": np.concatenate([inputs["input_ids"], [[token]]], axis=1), "attention_mask": mask}
        return tokens

    def run(self, inputs: dict[str, np.ndarray], adapter: str | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs for ``inputs`` (numpy arrays by input name) with ``adapter`` active (None: base); a
        cached graph given only ``input_ids`` and ``attention_mask`` starts from an empty cache."""
        if self.cache and "position_ids" not in inputs:
            inputs = self.first_step(inputs["input_ids"], inputs["attention_mask"])
        if adapter is not None and adapter not in self.adapter_files:
            known = ", ".join(self.adapter_files) or "none: this export is merged"
            raise AdapterError(f"no adapter {adapter!r} in this export (adapters: {known})", self.folder)
        if self._cuda is not None:
            return dict(zip(self.output_names, self._cuda.run(inputs, adapter, self.output_names)))
        options = ort.RunOptions()
        if adapter is not None:
            options.add_active_adapter(self._loaded[adapter])
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs, options)))


def _choose(logits: np.ndarray, temperature: float, top_p: float, random: np.random.Generator) -> int:
    """The most likely token (temperature 0), or one drawn from softmax(logits / T) restricted to the smallest set
    of most likely tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / temperature
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")
    before = np.cumsum(probabilities[order]) - probabilities[order]
    probabilities[order[before >= top_p]] = 0.0  # the tokens after the nucleus is full
    return int(random.choice(len(probabilities), p=probabilities / probabilities.sum()))


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
