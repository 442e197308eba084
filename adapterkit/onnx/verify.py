"""Check an export: run ONNX Runtime and torch on the same inputs and measure the largest absolute difference.

Merged: the graph against the torch model with the adapters merged. Unmerged: the graph with no adapter active against
a freshly loaded base model (the empty defaults must give the base), and with each adapter active against that base
with the adapter attached by :mod:`adapterkit.attach` (tested against PEFT), which shares no code with the export's
adapter slots. Batch and sequence length differ from the example sizes used while tracing, so the dynamic dims are
exercised too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from adapterkit.attach import attach
from adapterkit.onnx.export import Exported, load_base
from adapterkit.onnx.exportable import task_output
from adapterkit.onnx.runner import Runner

DEFAULT_ATOL = 1e-4


@dataclasses.dataclass
class Check:
    case: str
    output: str
    max_abs_diff: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol


def sample_inputs(vocab_size: int, batch: int = 3, sequence: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids and an attention mask with one padded position (so masking is exercised)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, sequence, dtype=torch.long)
    attention_mask[-1, -1] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def verify(exported: Exported, atol: float = DEFAULT_ATOL, runner: Runner | None = None) -> list[Check]:
    runner = runner or Runner(exported.folder)
    model = exported.torch_model
    inputs = sample_inputs(model.model.config.vocab_size, batch=max(3, len(exported.adapters) + 1))
    numpy_inputs = {name: tensor.numpy() for name, tensor in inputs.items()}
    output = runner.output_names[0]

    def check(case: str, adapter, expected: torch.Tensor) -> Check:
        actual = runner.run(numpy_inputs, adapter)[output]
        return Check(case, output, float(np.abs(actual - expected.numpy()).max()), atol)

    if exported.merged:
        return [check("merged", None, model.run(inputs["input_ids"], inputs["attention_mask"]))]
    base = load_base(exported.description["base"])
    with torch.no_grad():
        outputs = {None: task_output(base(**inputs))}
        checks = [check("no adapter vs base", None, outputs[None])]
        for name, (adapter, weight) in exported.adapters.items():
            with attach(base, [adapter], [weight], force=True):  # the base was checked when exporting
                outputs[name] = task_output(base(**inputs))
            checks.append(check(f"adapter {name}", name, outputs[name]))
    if runner.bank is not None and len(outputs) > 1:  # one run, each row with another adapter (or none)
        rows = [list(outputs)[(row + 1) % len(outputs)] for row in range(len(inputs["input_ids"]))]
        checks.append(check("mixed batch", rows, torch.stack([outputs[name][row] for row, name in enumerate(rows)])))
    return checks
