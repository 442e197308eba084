"""Training minimal adapters on the built-in tiny example: the loss falls, files validate and are reproducible,
BitFit touches biases only, the classification head travels with the adapter, torchrun gives the one-process result."""

from __future__ import annotations

import bz2
import copy
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import adapterkit
import tiny_models
from adapterkit.arrays import to_torch
from adapterkit.attach import attach
from adapterkit.cli import cli
from adapterkit.train.data import load_examples, read_records
from adapterkit.train.evaluate import evaluate
from adapterkit.train.base import load_base
from adapterkit.train.loop import TrainConfig, train

BIN = os.path.dirname(sys.executable)


def lm_config(example, method, **overrides):
    options = dict(data=str(example["support_casual"]), eval_data=str(example["support_sample"]), steps=12,
                   batch_size=8, lr=1e-2)
    options.update(overrides)
    return TrainConfig(method, "causal-lm", **options)


def classify_config(example, method="lora", **overrides):
    options = dict(data=str(example["sentiment_train"]), eval_data=str(example["sentiment_eval"]), epochs=2, lr=1e-2)
    options.update(overrides)
    return TrainConfig(method, "classify", **options)


@pytest.fixture(scope="module")
def lm_runs(example, tmp_path_factory):
    """One short causal-LM run per method, saved and reloaded: {method: (result, reloaded adapter)}."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for method in ("lora", "bitfit", "prefix"):
        result = train(example["llama"], lm_config(example, method), progress=False)
        adapterkit.save(result.adapter, folder / f"{method}.safetensors")
        runs[method] = (result, adapterkit.load(folder / f"{method}.safetensors"))
    return runs


@pytest.mark.parametrize("method", ["lora", "bitfit", "prefix"])
def test_loss_falls_and_output_validates(example, lm_runs, method):
    result, loaded = lm_runs[method]
    base = load_base(example["llama"], "causal-lm")
    examples = load_examples(example["support_sample"])
    before = evaluate(base.model, base.tokenizer, examples, "causal-lm")["loss"]
    after = result.history[-1]["loss"]
    assert after < before - 0.05, (before, after)
    # the reloaded file gives the loss training reported
    with attach(base.model, loaded):
        assert evaluate(base.model, base.tokenizer, examples, "causal-lm")["loss"] == pytest.approx(after, rel=1e-5)
    assert [c.kind for c in loaded.components] == [method]
    assert loaded.manifest.training["steps"] == 12 and loaded.manifest.training["method"] == method
    base = loaded.manifest.base_model
    assert base.fingerprint == adapterkit.fingerprint(example["llama"], algorithm="fp1")  # what 1.0 readers check
    assert base.fingerprints == {"fp2": adapterkit.fingerprint(example["llama"])}


def test_bitfit_changes_only_biases_and_detach_restores_the_base(example, lm_runs):
    _, adapter = lm_runs["bitfit"]
    assert {name.rsplit(".", 1)[1] for name in adapter.tensors} == {"bias"}
    model = AutoModelForCausalLM.from_pretrained(example["llama"]).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    # reference: the base with each Δb added to its module's bias by hand (Llama's linears have none: Δb is the bias)
    reference = copy.deepcopy(model)
    for target, roles in adapter.component_tensors("bitfit").items():
        roles = tiny_models.torch_roles(roles)
        module = reference.get_submodule(target)
        bias = module.bias.detach() if module.bias is not None else torch.zeros_like(roles["bias"])
        module.bias = torch.nn.Parameter(bias + roles["bias"])
    ids = torch.tensor([[5, 9, 11, 7, 20, 3]])
    with torch.no_grad(), attach(model, adapter):
        attached = model(ids).logits
    torch.testing.assert_close(attached, reference(ids).logits.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attached, model(ids).logits)  # the adapter did something
    state = model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)


def test_same_seed_gives_identical_bytes(example, tmp_path):
    paths = []
    for run, seed in enumerate((3, 3, 4)):
        result = train(example["bert"], classify_config(example, "bitfit", steps=4, eval_data=None, seed=seed),
                       progress=False)
        paths.append(tmp_path / f"run{run}.safetensors")
        adapterkit.save(result.adapter, paths[-1])
    first, second, other_seed = (p.read_bytes() for p in paths)
    assert first == second
    assert first != other_seed


def test_classification_head_is_saved_and_evaluate_gives_the_reported_accuracy(example, tmp_path):
    out = tmp_path / "sentiment.safetensors"
    result = CliRunner().invoke(cli, [
        "train", str(example["bert"]), "--method", "lora", "--task", "classify", "--data", str(example["sentiment_train"]),
        "--eval-data", str(example["sentiment_eval"]), "--epochs", "2", "--lr", "1e-2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "epoch 2: loss" in result.output
    adapter = adapterkit.load(out)
    training = adapter.manifest.training
    assert training["labels"] == ["negative", "positive"] and training["eval"]["accuracy"] > 0.8
    head = adapter.component("head")
    assert head.kind == "full" and head.targets == ["classifier"]
    assert set(adapter.component_tensors("head")["classifier"]) == {"weight", "bias"}
    # the fingerprint of the folder is what attach computes on the loaded classifier without its head
    model = AutoModelForSequenceClassification.from_pretrained(example["bert"], num_labels=2)
    assert adapter.manifest.base_model.fingerprints["fp2"] == adapterkit.fingerprint(model, exclude=["classifier"])
    assert adapter.manifest.base_model.fingerprint == adapterkit.fingerprint(model, exclude=["classifier"],
                                                                             algorithm="fp1")
    evaluated = CliRunner().invoke(cli, ["evaluate", str(example["bert"]), str(out), "--task", "classify",
                                         "--data", str(example["sentiment_eval"]), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["accuracy"] == training["eval"]["accuracy"]
    assert metrics["loss"] == pytest.approx(training["eval"]["loss"], rel=1e-5)


def test_torchrun_two_processes_equal_one_process(example, tmp_path):
    common = ["train", str(example["bert"]), "--method", "lora", "--task", "classify", "--data",
              str(example["sentiment_train"]), "--steps", "4", "--batch-size", "8", "--lr", "1e-2", "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    two = tmp_path / "two.safetensors"
    launched = subprocess.run(
        [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--no-python", shutil.which("adapterkit", path=BIN),
         *common, "-o", str(two)], capture_output=True, text=True, env=env, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = tmp_path / "one.safetensors"
    single = CliRunner().invoke(cli, [*common, "-o", str(one)])
    assert single.exit_code == 0, single.output
    parallel, serial = adapterkit.load(two), adapterkit.load(one)
    assert parallel.manifest.to_json() == serial.manifest.to_json()
    assert parallel.tensors.keys() == serial.tensors.keys()
    for name in serial.tensors:
        # float sums in another order, amplified a little by Adam; a wrong split would differ by ~lr per step
        torch.testing.assert_close(to_torch(parallel.tensors[name]), to_torch(serial.tensors[name]), rtol=1e-3,
                                   atol=3e-5)
    lora_b = [t for name, t in serial.tensors.items() if name.endswith("lora_B")]
    assert any(np.abs(t).max() > 0 for t in lora_b)  # trained, not the zero init


def test_data_formats_read_alike(tmp_path):
    records = [{"text": "a good film", "label": "positive"}, {"text": "a dull film", "label": "negative"}]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with bz2.open(tmp_path / "d.csv.bz2", "wt", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(records)
    assert read_records(tmp_path / "d.jsonl.gz") == records == read_records(tmp_path / "d.csv.bz2")
    examples = load_examples(tmp_path / "d.csv.bz2", label_field="label")
    assert examples.labels == ["negative", "positive"] and examples.label_ids == [1, 0]


@pytest.mark.parametrize("content, problem", [
    ('{"text": "x"}\nnot json\n', "line 2 is not JSON"),
    ('{"txt": "x"}\n', "record 1 has no field 'text'"),
])
def test_bad_data_is_one_line_error(example, tmp_path, content, problem):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    result = subprocess.run([os.path.join(BIN, "adapterkit"), "train", str(example["llama"]), "--data", str(data),
                             "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}: {problem}")
    assert not (tmp_path / "x.safetensors").exists()


def test_compare_writes_the_five_criteria(example, tmp_path):
    out = tmp_path / "compare"
    result = CliRunner().invoke(cli, [
        "compare", str(example["bert"]), "--task", "classify", "--data", str(example["sentiment_train"]),
        "--eval-data", str(example["sentiment_eval"]), "--methods", "lora", "--steps", "2", "--batch-size", "8",
        "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in rows] == ["lora"]
    base_bytes = (example["bert"] / "model.safetensors").stat().st_size
    for row in rows:
        adapter_file = out / f"{row['method']}.safetensors"
        assert row["adapter_bytes"] == adapter_file.stat().st_size and row["base_bytes"] == base_bytes
        assert row["storage_ratio"] == pytest.approx(row["adapter_bytes"] / base_bytes)
        assert row["steps"] == 2 and row["seconds_per_step"] > 0 and row["train_memory_mb"] >= 0
        assert 0 <= row["eval"]["accuracy"] <= 1 and row["latency_ratio"] > 0
        assert adapterkit.load(adapter_file).manifest.training["steps"] == 2
        assert row["method"] in result.output
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_command_is_deterministic(example, tmp_path):
    result = CliRunner().invoke(cli, ["example", "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    first = example["llama"].parent
    written = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert {"llama/model.safetensors", "llama/tokenizer.json", "bert/model.safetensors", "sentiment_eval.jsonl"} <= \
        {str(p) for p in written}
    for relative in written:
        assert (tmp_path / "again" / relative).read_bytes() == (first / relative).read_bytes(), relative
