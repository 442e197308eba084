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


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_banks_of_every_kind_on_gpt2_and_bert_from_the_command_line(family, tiny_dirs, tmp_path):
    """GPT-2 (Conv1D layers, learned positions, a head tied to its embedding) and BERT (an encoder): every kind in
    one bank (no cache), exported by ``adapterkit export --bank --verify``, whose checks run each row of one run
    against torch with that row's adapter alone."""
    model = load_base(tiny_dirs[family])
    for seed, kind in enumerate(KINDS, 1):
        save(random_adapter(kind, family, model, seed, VARIANTS[0]), tmp_path / f"{kind}.safetensors")
    done = call_cli("export", "--onnx", tiny_dirs[family], *(tmp_path / f"{kind}.safetensors" for kind in KINDS),
                    "--unmerged", "--bank", "--verify", "-o", tmp_path / "onnx")
    assert done.returncode == 0, done.stderr
    assert "an adapter bank" in done.stdout and "mixed batch" in done.stdout and "FAILED" not in done.stdout
    runner = Runner(tmp_path / "onnx")
    assert runner.cache is None and runner.adapters == list(KINDS)


def test_a_bank_is_unmerged(tiny_llama_dir, tmp_path):
    save(random_adapter("lora", "llama", load_base(tiny_llama_dir), 1, VARIANTS[0]), tmp_path / "a.safetensors")
    refused = call_cli("export", "--onnx", tiny_llama_dir, tmp_path / "a.safetensors", "--merged", "--bank",
                       "-o", tmp_path / "merged")
    assert refused.returncode != 0 and "--unmerged" in refused.stderr and not (tmp_path / "merged").exists()


def test_what_a_bank_cannot_hold_is_refused_in_one_line(tmp_path):
    """A prefix per row under a sliding window (Mistral) is refused while tracing: the error is ours, one line, not
    the exporter's report, and no folder is left."""
    import families

    families.build("mistral").save_pretrained(tmp_path / "mistral")
    model = load_base(tmp_path / "mistral")
    save(random_adapter("prefix", "llama", model, 1, VARIANTS[0]), tmp_path / "prefix.safetensors")
    done = call_cli("export", "--onnx", tmp_path / "mistral", tmp_path / "prefix.safetensors", "--unmerged", "--bank",
                    "-o", tmp_path / "onnx")
    assert done.returncode == 1 and not (tmp_path / "onnx").exists()
    assert done.stderr.splitlines()[-1].startswith("error: per-row prefixes") and "sliding window" in done.stderr
    assert "torch.export" not in done.stderr


def test_a_dora_slot_and_a_full_replacement_of_its_weight_cannot_share_a_graph(tiny_llama_dir, tmp_path):
    """DoRA's empty value is the base weight's norm: with a full adapter replacing that weight active, the "empty"
    DoRA would rescale it. Refused before any tracing, with or without a bank."""
    from adapterkit import Adapter, Manifest
    from adapterkit.train.init import new_components

    model = load_base(tiny_llama_dir)
    target = "model.layers.0.self_attn.q_proj"
    components, tensors = new_components(model, "full", targets=[target])
    full = Adapter(Manifest(components, random_adapter("dora", "llama", model, 1, VARIANTS[0]).manifest.base_model),
                   tensors)
    dora = random_adapter("dora", "llama", model, 2, VARIANTS[0])
    for bank in (False, True):
        with pytest.raises(RequestError, match=f"{target}: a dora adapter and a full adapter .* cannot share one graph"):
            export_onnx(tiny_llama_dir, [full, dora], tmp_path / "onnx", merged=False, bank=bank)
        assert not (tmp_path / "onnx").exists()
