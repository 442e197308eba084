"""Run an exported folder in ONNX Runtime, switching adapters per call without re-creating the session.

    runner = Runner("onnx/")                       # CUDA when onnxruntime-gpu sees a GPU, else CPU
    runner.provider                                # the provider that really runs (ORT falls back silently)
    runner.run({"input_ids": ids, "attention_mask": mask}, adapter="support")["logits"]
    runner.run(inputs)                             # no adapter: the base model
    runner.generate(prompt_ids, adapter="support", max_new_tokens=20)      # greedy (temperature=0.7: sampled)
    runner.add_adapter("late", "late.safetensors")   # at run time, same session (.onnx_adapter files too)
    runner.remove_adapter("late")

A bank graph (``export_onnx(..., bank=True)``, :mod:`adapterkit.onnx.bank`) also takes one adapter per row:

    runner.run(inputs, adapter=["support", None, "sales"])                  # row 0 support, row 1 the base, ...

A graph exported with its key/value cache (``export_onnx(..., cache=True)``) generates one token per step, feeding
the cache it returned; ``run`` on it starts from an empty cache. A plain graph generates by running the whole
sequence again for each token.

Without a bank, on CPU an adapter is activated per call with ``RunOptions.add_active_adapter`` (ONNX Runtime feeds its tensors as the
graph inputs of the same names). ONNX Runtime ignores active adapters under IO binding, which is what keeps tensors on
the GPU, so on CUDA :class:`_CudaBinding` binds each adapter's tensors itself from device copies made once per adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from adapterkit.errors import AdapterError, RequestError
from adapterkit.onnx.adapter_files import read_onnx_adapter
from adapterkit.onnx.bank import Bank
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
        described = self.description.get("bank")
        self.bank = None
        if described:
            self.bank = Bank(read_onnx_adapter(self.folder / described["empty"]), described["axes"],
                             described["lengths"])
        self._cuda = _CudaBinding(self.session) if self.provider == CUDA else None
        self._loaded: dict[str, object] = {}
        for adapter in self.description["adapters"]:
            if "file" in adapter:
                self.add_adapter(adapter["name"], self.folder / adapter["file"])

    @property
    def adapters(self) -> list[str]:
        return list(self._loaded)

    def add_adapter(self, name: str, path: str | os.PathLike, force: bool = False) -> None:
        """Load adapter ``name`` from ``path`` (a ``.onnx_adapter`` file, or an adapterkit ``.safetensors`` file made
        for this graph's base: its fingerprint is checked, unless ``force``) into this session; an adapter of that
        name is replaced."""
        path = Path(path)
        if self.bank is None and self._cuda is None and path.name.endswith(".onnx_adapter"):
            self._loaded[name] = _load(path)  # ONNX Runtime reads the file itself
            return
        self._add_feeds(name, self._feeds(path, force), path)

    def add_adapter_value(self, name: str, adapter, force: bool = False) -> None:
        """:meth:`add_adapter` for an :class:`~adapterkit.adapter.Adapter` already loaded (``adapterkit serve``)."""
        self._add_feeds(name, self._adapter_feeds(adapter, f"adapter {name!r}", force), None)

    def _add_feeds(self, name: str, feeds: dict[str, np.ndarray], source) -> None:
        if self.bank is not None:
            self.bank.add(name, feeds, source)
            if self._cuda is not None:
                self._cuda.forget_bank()
            self._loaded[name] = source
        elif self._cuda is not None:
            self._cuda.add(name, feeds)
            self._loaded[name] = source
        else:
            self._loaded[name] = _lora_adapter(feeds)

    def remove_adapter(self, name: str) -> None:
        if name not in self._loaded:
            raise RequestError(f"no adapter {name!r} in this session (adapters: {', '.join(self._loaded) or 'none'})")
        del self._loaded[name]
        if self.bank is not None:
            self.bank.remove(name)
            if self._cuda is not None:
                self._cuda.forget_bank()
        elif self._cuda is not None:
            self._cuda.remove(name)

    def _feeds(self, path: Path, force: bool) -> dict[str, np.ndarray]:
        """The slot tensors of an adapter file: as stored (``.onnx_adapter``), or folded from an adapterkit file
        against the base the graph was exported from (its fingerprint checked, its targets resolved on the base's
        module tree)."""
        if path.name.endswith(".onnx_adapter"):
            try:
                return read_onnx_adapter(path)
            except (RuntimeError, OSError) as exc:
                raise AdapterError(f"not a readable .onnx_adapter file ({exc})", path) from None
        from adapterkit.io.adapter_file import load

        return self._adapter_feeds(load(path), str(path), force)

    def _adapter_feeds(self, adapter, where: str, force: bool) -> dict[str, np.ndarray]:
        """An adapter's slot tensors, folded against the base the graph was exported from (its fingerprint checked,
        its targets resolved on the base's module tree)."""
        from adapterkit.fingerprints import check_base
        from adapterkit.onnx.slots import adapter_feeds
        from adapterkit.targets import skeleton

        base = self.description.get("base")
        if not base or not os.path.isfile(os.path.join(base, "config.json")):
            raise AdapterError(f"{where}: the base this graph was exported from ({base}) is not here to resolve the "
                               "adapter's targets: convert the adapter to .onnx_adapter there first", self.folder)
        check_base(adapter, base, where, force)
        return {slot: tensor.numpy() for slot, tensor in adapter_feeds(adapter, 1.0, skeleton(base)).items()}

    @property
    def cache(self) -> dict | None:
        """The key/value cache layout of a cached graph (``layers``, ``kv_heads``, ``head_dim``), else None."""
        return self.description.get("cache")

    def first_step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """A cached graph's inputs for a first step: each row's tokens numbered from 0 after its left padding (as
        transformers' ``generate`` numbers them; without left padding 0..n-1, as the model numbers them itself), an
        empty cache."""
        cache = self.cache
        empty = np.zeros((input_ids.shape[0], cache["kv_heads"], 0, cache["head_dim"]), np.float32)
        past = {f"past_key_values.{layer}.{part}": empty for layer in range(cache["layers"])
                for part in ("key", "value")}
        padding = np.argmax(attention_mask, axis=1)[:, None]  # each row's left padding (its first real token)
        positions = np.maximum(np.arange(input_ids.shape[1])[None] - padding, 0).astype(np.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions, **past}

    def generate(self, prompt, adapter: str | None = None, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[int]:
        """The tokens that follow ``prompt`` (token ids): the most likely each time (``temperature`` 0), or drawn from
        softmax(logits / temperature) within the ``top_p`` nucleus, with ``seed``."""
        return self.generate_batch([prompt], [adapter], max_new_tokens, temperature, top_p, seed)[0]

    def generate_batch(self, prompts, adapters: list[str | None] | None = None, max_new_tokens: int = 16,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[list[int]]:
        """:meth:`generate` for several prompts in one batch (left-padded), row i with ``adapters[i]`` (one adapter
        for all rows unless the graph has a bank); a row ends at the model's end-of-sequence token (a cached graph
        records it) or after ``max_new_tokens``. Prompts of different lengths need a cached graph, which takes each
        row's positions."""
        random = np.random.default_rng(seed)
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise RequestError(f"{len(adapters)} adapters for {len(prompts)} prompts")
        if self.bank is None and len(set(adapters)) > 1:
            raise RequestError("rows with different adapters need a graph exported with an adapter bank (--bank)")
        longest = max(len(prompt) for prompt in prompts)
        if not self.cache and any(len(prompt) != longest for prompt in prompts):
            raise RequestError("prompts of different lengths in one batch need a key/value cache graph (--cache)")
        ids = np.zeros((len(prompts), longest), np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):], mask[row, longest - len(prompt):] = prompt, 1
        inputs = self.first_step(ids, mask) if self.cache else {"input_ids": ids, "attention_mask": mask}
        rows = adapters if self.bank is not None else adapters[0]
        eos = self.description.get("generation", {}).get("eos_token_id")
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        tokens: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)  # a row ends with its end-of-sequence token, as in transformers
        for _ in range(max_new_tokens):
            if all(finished):
                break
            outputs = self.run(inputs, rows)
            chosen = np.array([[_choose(logits[-1], temperature, top_p, random)]
                               for logits in outputs[self.output_names[0]]], np.int64)
            for row, token in enumerate(chosen[:, 0].tolist()):
                if not finished[row]:
                    tokens[row].append(token)
                    finished[row] = token in eos
            mask = np.concatenate([mask, np.ones_like(chosen)], axis=1)
            if self.cache:  # one new token per row, after the cache the step returned
                past = {name.replace("present", "past_key_values", 1): outputs[name] for name in self.output_names[1:]}
                inputs = {"input_ids": chosen, "attention_mask": mask,
                          "position_ids": mask.sum(axis=1, keepdims=True) - 1, **past}
            else:
                inputs = {"input_ids": np.concatenate([inputs["input_ids"], chosen], axis=1), "attention_mask": mask}
        return tokens

    def run(self, inputs: dict[str, np.ndarray], adapter: str | list[str | None] | None = None
            ) -> dict[str, np.ndarray]:
        """The graph's outputs for ``inputs`` (numpy arrays by input name) with ``adapter`` active (None: base), or
        in a bank graph one adapter (or None) per row; a cached graph given only ``input_ids`` and
        ``attention_mask`` starts from an empty cache."""
        if self.cache and "position_ids" not in inputs:
            inputs = self.first_step(inputs["input_ids"], inputs["attention_mask"])
        if self.bank is not None:
            rows = adapter if isinstance(adapter, (list, tuple)) else [adapter] * len(inputs["input_ids"])
            if len(rows) != len(inputs["input_ids"]):
                raise RequestError(f"{len(rows)} adapters for {len(inputs['input_ids'])} rows")
            inputs = {**inputs, self.description["bank"]["index"]: self.bank.index(rows)}
            if self._cuda is not None:
                return dict(zip(self.output_names, self._cuda.run(inputs, self.output_names, self.bank)))
            return dict(zip(self.output_names, self.session.run(self.output_names, {**inputs, **self.bank.arrays()})))
        if isinstance(adapter, (list, tuple)):
            raise RequestError("one adapter per row needs a graph exported with an adapter bank (export --bank)")
        if adapter is not None and adapter not in self._loaded:
            known = ", ".join(self._loaded) or "none: this export is merged"
            raise AdapterError(f"no adapter {adapter!r} in this export (adapters: {known})", self.folder)
        if self._cuda is not None:
            return dict(zip(self.output_names, self._cuda.run(inputs, self.output_names, adapter=adapter)))
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
    try:
        adapter.Load(os.fspath(path))
    except RuntimeError as exc:
        raise AdapterError(f"not a readable .onnx_adapter file ({exc})", path) from None
    return adapter


def _lora_adapter(feeds: dict[str, np.ndarray]) -> ort.LoraAdapter:
    """An ONNX Runtime adapter holding ``feeds`` (ONNX Runtime loads adapters from files or bytes only)."""
    import tempfile

    from adapterkit.onnx.adapter_files import write_onnx_adapter

    with tempfile.TemporaryDirectory() as temporary:
        path = Path(temporary) / "adapter.onnx_adapter"
        write_onnx_adapter({name: _as_torch(array) for name, array in feeds.items()}, path)
        return _load(path)


def _as_torch(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


class _CudaBinding:
    """The CUDA path (not tested here, no GPU): IO binding with each adapter's tensors (or the bank's) kept as device
    OrtValues, made once per adapter (per change of the bank)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.device_tensors: dict[str, dict[str, ort.OrtValue]] = {}
        self._bank: dict[str, ort.OrtValue] | None = None

    def add(self, name: str, feeds: dict[str, np.ndarray]) -> None:
        self.device_tensors[name] = {slot: _on_device(array) for slot, array in feeds.items()}

    def remove(self, name: str) -> None:
        self.device_tensors.pop(name, None)

    def forget_bank(self) -> None:
        self._bank = None

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str], bank: Bank | None = None,
            adapter: str | None = None) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_ortvalue_input(name, _on_device(array))
        if bank is not None:
            if self._bank is None:
                self._bank = {name: _on_device(array) for name, array in bank.arrays().items()}
            adapter_tensors = self._bank
        else:  # unbound slots keep their defaults: the base
            adapter_tensors = self.device_tensors.get(adapter, {})
        for name, value in adapter_tensors.items():
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def _on_device(array: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
