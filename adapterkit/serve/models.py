"""What the serving engine runs: a model that takes a batch whose rows name their own adapters, and a key/value cache.

- :class:`TorchModel`: a transformers causal LM, its adapters attached per row (:mod:`adapterkit.attach.rows`);
- :class:`OnnxModel`: a folder exported with an adapter bank and a key/value cache (``export --onnx --unmerged
  --bank --cache``), run in ONNX Runtime; its adapters are the bank's entries (:mod:`adapterkit.onnx.bank`).

Both give ``forward(adapters, ids, mask, positions, cache) -> (logits of each row's last token, cache)``, where the
cache's ``layers`` each hold ``keys`` and ``values`` [rows, kv_heads, positions, head_dim] as torch tensors, which the
engine pads, appends and cuts; and ``attach(adapters)``, which makes exactly ``adapters`` available (keeping the
current set when one is refused).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from adapterkit.adapter import Adapter
from adapterkit.attach import attach
from adapterkit.errors import RequestError

log = logging.getLogger(__name__)


def _eos(token) -> set[int]:
    return set() if token is None else {token} if isinstance(token, int) else set(token)


class TorchModel:
    def __init__(self, model: torch.nn.Module, force: bool = False):
        self.model, self.force = model.eval(), force
        config = model.config
        self.vocab_size = config.vocab_size
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.eos = _eos(getattr(model.generation_config, "eos_token_id", None))
        self._handle = None
        self._adapters: dict[str, Adapter] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def attach(self, adapters: dict[str, Adapter]) -> None:
        attached = self._handle is not None
        self.detach()
        try:
            self._handle = attach(self.model, list(adapters.values()), force=self.force, per_row=True)
        except Exception:
            if attached:
                self._handle = attach(self.model, list(self._adapters.values()), force=self.force, per_row=True)
            raise
        self._adapters = dict(adapters)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.detach()
            self._handle = None

    def forward(self, adapters: list[str | None], ids, mask, positions, cache):
        names = list(self._adapters)
        index = [None if name is None else names.index(name) for name in adapters]
        with torch.inference_mode(), self._handle.rows(index):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.cache


@dataclass
class _Layer:
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class _Cache:
    layers: list[_Layer]


class OnnxModel:
    """``folder``: an export with a bank and a cache, whose ``adapterkit.json`` records the model's vocabulary,
    positions and end-of-sequence tokens. Adapters come as :class:`Adapter` values, fingerprint-checked against the
    base the folder was exported from."""

    def __init__(self, folder: str | os.PathLike, force: bool = False):
        from adapterkit.onnx.runner import Runner

        self.runner, self.force = Runner(folder), force
        if self.runner.bank is None or self.runner.cache is None:
            raise RequestError("serving an ONNX folder needs a graph with an adapter bank and a key/value cache: "
                               "export it with --unmerged --bank --cache", folder)
        generation = self.runner.description.get("generation", {})
        self.vocab_size = generation.get("vocab_size") or self.runner.description["outputs"][0]["shape"][-1]
        self.max_length = generation.get("max_positions")
        self.eos = _eos(generation.get("eos_token_id"))
        self.device = torch.device("cpu")  # the cache comes back from ONNX Runtime in host memory
        self._adapters: dict[str, Adapter] = {}
        for name in self.runner.adapters:  # served: the adapters the engine is given, not the folder's files
            self.runner.remove_adapter(name)

    def attach(self, adapters: dict[str, Adapter]) -> None:
        previous = dict(self._adapters)
        try:
            for name in [n for n in self._adapters if n not in adapters]:
                self.runner.remove_adapter(name)
                del self._adapters[name]
            for name, adapter in adapters.items():
                if self._adapters.get(name) is not adapter:
                    self.runner.add_adapter_value(name, adapter, self.force)
                    self._adapters[name] = adapter
        except Exception:
            for name in [n for n in self._adapters if n not in previous]:
                self.runner.remove_adapter(name)
            for name, adapter in previous.items():
                if self._adapters.get(name) is not adapter:
                    self.runner.add_adapter_value(name, adapter, self.force)
            self._adapters = previous
            raise

    def detach(self) -> None:
        pass  # nothing in the session changes: the bank is fed with each run

    def forward(self, adapters: list[str | None], ids, mask, positions, cache):
        layers = self.runner.cache["layers"]
        if cache is None:
            first = self.runner.first_step(ids.numpy(), mask.numpy())
            past = {name: value for name, value in first.items() if name.startswith("past_key_values.")}
        else:
            past = {}
            for i, layer in enumerate(cache.layers):
                past[f"past_key_values.{i}.key"] = layer.keys.numpy()
                past[f"past_key_values.{i}.value"] = layer.values.numpy()
        inputs = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(), **past}
        outputs = self.runner.run(inputs, list(adapters))
        logits = torch.from_numpy(outputs[self.runner.output_names[0]][:, -1].copy())
        present = [_Layer(torch.from_numpy(np.ascontiguousarray(outputs[f"present.{i}.key"])),
                          torch.from_numpy(np.ascontiguousarray(outputs[f"present.{i}.value"])))
                   for i in range(layers)]
        return logits, _Cache(present)
