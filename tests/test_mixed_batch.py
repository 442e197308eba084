"""Mixed batches in torch: a per-row attach gives each row of a batch its own adapter (or none), and each row's
result must be the one it gets alone, with only its adapter attached the ordinary way — for every registered kind, on
Llama, GPT-2 and BERT, with adapters of different ranks / prefix lengths / bottleneck sizes side by side."""

from __future__ import annotations

import pytest
import torch

import tiny_models
from adapterkit import Adapter, BaseModel, Manifest, fingerprint
from adapterkit.attach import attach
from adapterkit.errors import RequestError
from adapterkit.kinds import KINDS, get_kind
from adapterkit.train.init import new_components, option_defaults
from test_attach import assert_restored, snapshot

IDS = torch.tensor([[1, 5, 9, 33, 2, 77], [4, 8, 15, 16, 23, 42], [7, 7, 3, 99, 12, 1], [0, 0, 5, 6, 8, 127],
                    [11, 22, 33, 44, 55, 66]])
MASK = torch.tensor([[1] * 6, [1] * 6, [1] * 6, [0, 0, 1, 1, 1, 1], [1] * 6])  # row 3 is left-padded
#: row -> adapter: two of the kind under test (different sizes), a LoRA, and the base (None)
ROWS = [0, 1, None, 2, 0]
#: the kind's two variants: other ranks, prefix lengths, bottleneck sizes
VARIANTS = [{"rank": 4, "prefix_length": 3, "reduction_factor": 16.0},
            {"rank": 8, "prefix_length": 5, "reduction_factor": 8.0}]
#: what a full-tensor (head) adapter replaces: the head, or an embedding (GPT-2's, tied to its head: both change)
HEADS = {"llama": ["lm_head"], "gpt2": ["transformer.wte"], "bert": ["embeddings.word_embeddings"]}


def random_adapter(kind: str, family: str, model: torch.nn.Module, seed: int, variant: dict) -> Adapter:
    """An adapter of ``kind`` with random (non-trivial) tensors, as tests/test_kind_contract.py makes them."""
    generator = torch.Generator().manual_seed(seed)
    targets = HEADS[family] if kind == "full" else None
    components, tensors = new_components(model, kind, targets=targets, options={**option_defaults(), **variant},
                                         generator=generator)
    randomised = {name: value + torch.randn(value.shape, generator=generator, dtype=value.dtype) * 0.1
                  for name, value in tensors.items()}
    replaced = [t for c in components for t in get_kind(c.kind).replaced_targets(c)]
    return Adapter(Manifest(components, BaseModel("tiny", None, fingerprint(model, exclude=replaced))), randomised)


def output(model, ids, mask):
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def alone(model, adapters, rows):
    """The reference: each row run by itself, its adapter attached the ordinary way (or none)."""
    results = []
    for row, adapter in enumerate(rows):
        ids, mask = IDS[row:row + 1], MASK[row:row + 1]
        if adapter is None:
            results.append(output(model, ids, mask))
        else:
            with attach(model, adapters[adapter]):
                results.append(output(model, ids, mask))
    return torch.cat(results)


CASES = [(kind, family) for kind in KINDS for family in tiny_models.MODELS]


@pytest.mark.parametrize("kind,family", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_each_row_gets_what_it_gets_alone_with_its_adapter(kind, family):
    model = tiny_models.MODELS[family]()
    adapters = [random_adapter(kind, family, model, seed, variant) for seed, variant in enumerate(VARIANTS)]
    adapters.append(random_adapter("lora", family, model, 7, VARIANTS[0]))
    expected = alone(model, adapters, ROWS)
    before = snapshot(model)
    with attach(model, adapters, per_row=True) as handle:
        with handle.rows(ROWS):
            mixed = output(model, IDS, MASK)
        with handle.rows([2, 1]):  # another batch through the same attach
            again = output(model, IDS[[3, 1]], MASK[[3, 1]])
    assert_restored(model, before)
    assert not torch.allclose(expected[0], expected[1], atol=1e-4), "the two adapters must differ"
    real = MASK.bool()  # padded positions' outputs are not compared (no reference defines them)
    torch.testing.assert_close(mixed[real], expected[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again[real[[3, 1]]], expected[[3, 1]][real[[3, 1]]], atol=2e-5, rtol=1e-4)


def test_rows_are_required_and_checked():
    model = tiny_models.llama()
    adapter = random_adapter("lora", "llama", model, 0, VARIANTS[0])
    with attach(model, [adapter], per_row=True) as handle:
        with pytest.raises(RequestError, match="handle.rows"):
            output(model, IDS, MASK)
        with pytest.raises(RequestError, match="one of 0..0 or -1"):
            with handle.rows([0, 1]):
                pass
    with attach(model, adapter) as handle:
        with pytest.raises(RequestError, match="per_row=True"):
            with handle.rows([0]):
                pass
