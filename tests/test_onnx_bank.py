"""The ONNX adapter bank (export_onnx(..., bank=True)): one ONNX Runtime run where each row of the batch uses its own
adapter — every kind, LoRA of two ranks, prefixes of two lengths, and rows with no adapter — gives each row what
torch gives it alone with only its adapter attached the ordinary way (attach shares nothing with the bank's stacking
and gathering); generating through the bank's key/value cache, row by row with mixed adapters and prompt lengths,
gives what transformers' generate gives each prompt alone. Adapters are added to and removed from the bank at run
time in the same session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterkit.attach import attach
from adapterkit.errors import AdapterError, RequestError
from adapterkit.io.adapter_file import save
from adapterkit.kinds import KINDS
from adapterkit.onnx.adapter_files import write_onnx_adapter
from adapterkit.onnx.export import export_onnx, load_base
from adapterkit.onnx.runner import Runner
from cli_runner import call_cli
from test_mixed_batch import VARIANTS, random_adapter

ATOL = 1e-4
#: the bank: every registered kind, and the two kinds whose sizes differ between adapters twice
BANK = [(kind, VARIANTS[0]) for kind in KINDS] + [("lora", VARIANTS[1]), ("prefix", VARIANTS[1])]
SEQUENCE = 6


def bank_name(kind: str, variant: dict) -> str:
    return kind if variant is VARIANTS[0] else f"{kind}_2"


@pytest.fixture(scope="module")
def bank(tiny_llama_dir, tmp_path_factory):
    model = load_base(tiny_llama_dir)
    adapters = {bank_name(kind, variant): random_adapter(kind, "llama", model, seed, variant)
                for seed, (kind, variant) in enumerate(BANK, start=1)}
    exported = export_onnx(tiny_llama_dir, list(adapters.values()), tmp_path_factory.mktemp("bank") / "onnx",
                           merged=False, names=list(adapters), bank=True, cache=True)
    return exported, Runner(exported.folder), model, adapters


def rows_alone(model, adapters, ids, mask, rows) -> np.ndarray:
    """The reference: each row run by itself with its adapter attached (or none), its tokens numbered from 0 after
    its left padding."""
    positions = (torch.arange(ids.shape[1])[None] - mask.argmax(1)[:, None]).clamp(min=0)
    results = []
    for row, name in enumerate(rows):
        with torch.no_grad(), attach(model, adapters[name]) if name else torch.no_grad():
            results.append(model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                                 position_ids=positions[row:row + 1]).logits)
    return torch.cat(results).numpy()


def batch(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (rows, SEQUENCE), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def test_each_row_of_one_run_gets_what_its_adapter_gives_alone(bank):
    _, runner, model, adapters = bank
    rows = [*adapters, None, "prefix_2", "lora"]  # every adapter, the base, and adapters repeated
    ids, mask = batch(len(rows))
    actual = runner.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, rows)["logits"]
    expected = rows_alone(model, adapters, ids, mask, rows)
    for row, name in enumerate(rows):
        assert np.abs(actual[row] - expected[row]).max() < ATOL, f"row {row} ({name or 'base'})"


def test_a_left_padded_row_with_and_without_a_prefix(bank):
    _, runner, model, adapters = bank
    rows = ["prefix", None, "lora_2"]
    ids, mask = batch(len(rows), seed=1)
    mask[:, :2] = 0  # every row left-padded: its padding positions may see no key at all
    actual = runner.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, rows)["logits"]
    expected = rows_alone(model, adapters, ids, mask, rows)
    assert np.isfinite(actual).all()
    real = mask.bool().numpy()
    assert np.abs(actual[real] - expected[real]).max() < ATOL


def test_generating_rows_with_mixed_adapters_and_lengths_equals_generate_alone(bank):
    _, runner, model, adapters = bank
    prompts = [[1, 5, 9, 33, 2], [4, 8, 15, 16, 23, 42, 99, 127], [7, 3], [11, 12, 13, 14, 15, 16]]
    rows = ["prefix_2", "lora", None, "adapter"]
    generated = runner.generate_batch(prompts, rows, max_new_tokens=6)
    for prompt, name, tokens in zip(prompts, rows, generated):
        ids = torch.tensor([prompt])
        with torch.no_grad(), attach(model, adapters[name]) if name else torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == expected, name


def test_export_bank_from_the_command_line_verifies_row_by_row(tiny_llama_dir, bank, tmp_path):
    _, _, model, adapters = bank
    for name in ("lora_2", "prefix"):
        save(adapters[name], tmp_path / f"{name}.safetensors")
    done = call_cli("export", "--onnx", tiny_llama_dir, tmp_path / "lora_2.safetensors",
                    tmp_path / "prefix.safetensors", "--unmerged", "--bank", "--verify", "-o", tmp_path / "plain")
    assert done.returncode == 0, done.stderr
    assert "an adapter bank" in done.stdout and "mixed batch" in done.stdout and "FAILED" not in done.stdout
    runner = Runner(tmp_path / "plain")
    assert runner.cache is None and runner.adapters == ["lora_2", "prefix"]
    refused = call_cli("export", "--onnx", tiny_llama_dir, tmp_path / "prefix.safetensors", "--merged", "--bank",
                       "-o", tmp_path / "merged")
    assert refused.returncode != 0 and not (tmp_path / "merged").exists()


def test_adapters_join_and_leave_the_bank_in_the_same_session(bank, tmp_path):
    _, runner, model, adapters = bank
    session = runner.session
    late = random_adapter("lora", "llama", model, 99, VARIANTS[1])
    save(late, tmp_path / "late.safetensors")
    runner.add_adapter("late", tmp_path / "late.safetensors")
    rows = ["late", "bitfit", None]
    ids, mask = batch(len(rows), seed=2)
    actual = runner.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, rows)["logits"]
    assert np.abs(actual - rows_alone(model, {**adapters, "late": late}, ids, mask, rows)).max() < ATOL
    runner.remove_adapter("late")
    with pytest.raises(RequestError, match="no adapter 'late'"):
        runner.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, rows)
    assert runner.session is session and "late" not in runner.adapters
    still = runner.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, ["bitfit", "bitfit", None])
    assert np.abs(still["logits"][1:] - actual[1:]).max() < ATOL, "the other adapters are untouched"


def test_an_adapter_that_does_not_fit_the_graph_is_refused(bank, tmp_path):
    _, runner, _, _ = bank
    lora_a = next(slot for slot in runner.bank.empty if slot.endswith(".lora.lora_A"))
    in_features = runner.bank.empty[lora_a].shape[1]
    cases = {"elsewhere": ({"model.norm.lora.lora_A": torch.zeros(2, 3)}, "no input for"),
             "misshapen": ({lora_a: torch.zeros(2, in_features + 1)}, "the graph takes"),
             "nan": ({lora_a: torch.full((2, in_features), float("nan"))}, "NaN")}
    for name, (feeds, message) in cases.items():
        write_onnx_adapter(feeds, tmp_path / f"{name}.onnx_adapter")
        with pytest.raises(AdapterError, match=message):
            runner.add_adapter(name, tmp_path / f"{name}.onnx_adapter")
        assert name not in runner.adapters
