"""ONNX export, merged and unmerged, run in ONNX Runtime and compared with torch references that do not share the
export's code: the base model as loaded by transformers, adapters attached with adapterkit.attach (checked against
PEFT in test_attach.py), and, for prefix tuning, transformers' own key/value cache holding the prefix (PEFT's way).

Exports are slow-ish, so each graph is exported once per module and shared by the tests that read it.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache

import tiny_models
from adapterkit import Adapter, AdapterError, BaseModel, Component, Manifest, fingerprint
from adapterkit.adapter import tensor_name
from adapterkit.arrays import to_torch
from adapterkit.attach import attach
from adapterkit.cli import main
from adapterkit.io.adapter_file import save
from adapterkit.onnx.export import export_onnx, load_base
from adapterkit.onnx.exportable import task_output
from adapterkit.onnx.runner import Runner
from adapterkit.onnx.verify import sample_inputs, verify

ATOL = 1e-4
LLAMA_LAYERS = range(2)


def bitfit(model, targets, seed: int, name: str = "bias") -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors = {tensor_name(name, t, "bias"): torch.randn(modules[t].bias.shape, generator=generator) * 0.1
               for t in targets}
    manifest = Manifest([Component(name, "bitfit", list(targets))], BaseModel("tiny", None, fingerprint(model)))
    return Adapter(manifest, tensors)


def prefix(model, targets, kv_heads: int, head_dim: int, length: int, seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    tensors = {tensor_name("prefix", t, role): torch.randn(kv_heads, length, head_dim, generator=generator)
               for t in targets for role in ("prefix_key", "prefix_value")}
    manifest = Manifest([Component("prefix", "prefix", list(targets), {"prefix_length": length})],
                        BaseModel("tiny", None, fingerprint(model)))
    return Adapter(manifest, tensors)


def classifier_adapter(model, seed: int) -> Adapter:
    """LoRA on the attention plus a new classification head (a ``full`` component), as training a classifier gives."""
    lora = tiny_models.random_lora(model, [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2)
                                           for m in ("query", "value")], seed=seed, name="lora")
    generator = torch.Generator().manual_seed(seed + 100)
    head = {tensor_name("head", "classifier", "weight"): torch.randn(2, 32, generator=generator),
            tensor_name("head", "classifier", "bias"): torch.randn(2, generator=generator)}
    components = [*lora.components, Component("head", "full", ["classifier"])]
    base = BaseModel("tiny", None, fingerprint(model, exclude=["classifier"]))
    return Adapter(Manifest(components, base), {**lora.tensors, **head})


def torch_output(model, inputs, adapters=(), weights=None, **extra) -> np.ndarray:
    """The reference: ``model`` with ``adapters`` attached (adapterkit.attach), detached again afterwards."""
    with attach(model, list(adapters), weights), torch.no_grad():
        return task_output(model(**inputs, **extra)).numpy()


def numpy(inputs):
    return {name: tensor.numpy() for name, tensor in inputs.items()}


def max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


# -- Llama: two LoRAs and a prefix in one unmerged graph -----------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, tmp_path_factory):
    model = load_base(tiny_llama_dir)
    adapters = {
        "a": tiny_models.random_lora(model, [f"model.layers.{i}.self_attn.{m}" for i in LLAMA_LAYERS
                                             for m in ("q_proj", "v_proj")], rank=4, alpha=8, seed=1),
        "b": tiny_models.random_lora(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
                                     rank=2, alpha=4, scaling="rslora", seed=2),
        "prefix": prefix(model, [f"model.layers.{i}.self_attn" for i in LLAMA_LAYERS], kv_heads=2, head_dim=8,
                         length=3, seed=3),
    }
    folder = tmp_path_factory.mktemp("onnx") / "llama"
    exported = export_onnx(tiny_llama_dir, list(adapters.values()), folder, merged=False, names=list(adapters),
                           weights=[1.0, 0.5, 1.0])
    return model, adapters, exported, Runner(folder)


def test_llama_no_adapter_is_the_base(llama):
    model, _, _, runner = llama
    inputs = sample_inputs(tiny_models.VOCAB)
    assert max_diff(runner.run(numpy(inputs))["logits"], torch_output(model, inputs)) < ATOL
    assert runner.provider == "CPUExecutionProvider"  # this machine has no GPU: the runner says what really runs
    with pytest.raises(AdapterError, match="no adapter 'c'"):
        runner.run(numpy(inputs), "c")


def test_llama_lora_swapped_in_one_session(llama):
    model, adapters, _, runner = llama
    session = runner.session
    inputs = sample_inputs(tiny_models.VOCAB)
    expected = {"a": torch_output(model, inputs, [adapters["a"]]),
                "b": torch_output(model, inputs, [adapters["b"]], [0.5]),
                None: torch_output(model, inputs)}
    assert max_diff(expected["a"], expected["b"]) > 100 * ATOL  # the adapters differ enough to tell apart
    for name in ("a", "b", None, "b", "a"):
        assert max_diff(runner.run(numpy(inputs), name)["logits"], expected[name]) < ATOL, name
    assert runner.session is session


def test_llama_prefix_matches_a_transformers_kv_cache(llama):
    """A prefix is p past keys/values in every layer (spec §6.4): transformers' own cache holding them, the new
    tokens at positions p..p+n-1 and the mask grown by p, is an independent reference; attach must agree too."""
    model, adapters, _, runner = llama
    inputs = sample_inputs(tiny_models.VOCAB)
    batch, length = inputs["input_ids"].shape
    p = 3
    cache = DynamicCache(config=model.config)
    for layer in LLAMA_LAYERS:
        roles = adapters["prefix"].component_tensors("prefix")[f"model.layers.{layer}.self_attn"]
        cache.update(*(to_torch(roles[r]).expand(batch, -1, -1, -1) for r in ("prefix_key", "prefix_value")), layer)
    mask = torch.cat([torch.ones(batch, p, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"], attention_mask=mask, cache=cache,
                         position_ids=torch.arange(p, p + length).expand(batch, -1)).logits.numpy()
    actual = runner.run(numpy(inputs), "prefix")["logits"]
    assert max_diff(actual, expected) < ATOL
    assert max_diff(actual, torch_output(model, inputs, [adapters["prefix"]])) < ATOL
    assert max_diff(actual, runner.run(numpy(inputs))["logits"]) > 100 * ATOL


def test_llama_graph_layout(llama):
    """Adapter tensors are graph inputs with a symbolic rank / prefix-length dim and an empty default."""
    import onnx

    _, _, exported, _ = llama
    graph = onnx.load(exported.folder / "model.onnx").graph
    initializers = {i.name: list(i.dims) for i in graph.initializer}
    inputs = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    a = "model.layers.0.self_attn.q_proj.lora.lora_A"
    assert inputs[a][0].dim_param and initializers[a] == [0, 32]
    key = "model.layers.1.self_attn.prefix.prefix_key"
    assert inputs[key][1].dim_param and initializers[key] == [2, 0, 8]
    description = json.loads((exported.folder / "adapterkit.json").read_text())
    assert [a["name"] for a in description["adapters"]] == ["a", "b", "prefix"]
    assert all((exported.folder / a["file"]).is_file() for a in description["adapters"])


def test_verify_passes_on_the_llama_export(llama):
    _, _, exported, runner = llama
    checks = verify(exported, ATOL, runner)
    assert [c.case for c in checks] == ["no adapter vs base", "adapter a", "adapter b", "adapter prefix"]
    assert all(c.passed for c in checks)


def test_verify_catches_a_wrong_adapter_file(llama, tmp_path):
    """Swap adapter a's file for b's: the graph no longer computes what torch does with a, and verify says so."""
    import dataclasses
    import shutil

    _, _, exported, _ = llama
    copy = shutil.copytree(exported.folder, tmp_path / "copy")
    shutil.copyfile(copy / "adapters" / "b.onnx_adapter", copy / "adapters" / "a.onnx_adapter")
    checks = {c.case: c for c in verify(dataclasses.replace(exported, folder=copy), ATOL)}
    assert not checks["adapter a"].passed and checks["adapter b"].passed and checks["no adapter vs base"].passed


def test_llama_merged(tiny_llama_dir, llama, tmp_path):
    model, adapters, _, _ = llama
    export_onnx(tiny_llama_dir, [adapters["a"], adapters["b"]], tmp_path, merged=True, weights=[1.0, 0.5])
    inputs = sample_inputs(tiny_models.VOCAB, batch=1, sequence=9)
    expected = torch_output(model, inputs, [adapters["a"], adapters["b"]], [1.0, 0.5])
    assert max_diff(Runner(tmp_path).run(numpy(inputs))["logits"], expected) < ATOL


def test_llama_lora_on_the_embedding_unmerged(tiny_llama_dir, llama, tmp_path):
    """Token ids pick columns of A: a LoRA on embed_tokens (stored [vocab, hidden], so fan_in_fan_out) is a slot too."""
    model = llama[0]
    embedding = tiny_models.random_lora(model, ["model.embed_tokens"], fan_in_fan_out=True, seed=11, name="emb")
    export_onnx(tiny_llama_dir, [embedding], tmp_path, merged=False, names=["emb"])
    runner, inputs = Runner(tmp_path), sample_inputs(tiny_models.VOCAB)
    expected = torch_output(model, inputs, [embedding])
    assert max_diff(expected, torch_output(model, inputs)) > 100 * ATOL
    assert max_diff(runner.run(numpy(inputs), "emb")["logits"], expected) < ATOL
    assert max_diff(runner.run(numpy(inputs))["logits"], torch_output(model, inputs)) < ATOL


def test_onnx_adapter_converter_feeds_the_graph(llama, tmp_path):
    """``adapterkit convert --to onnx-adapter`` writes the tensors the graph takes: A as is, B times s = α/r."""
    from adapterkit.converters import onnx_adapter
    from adapterkit.onnx.adapter_files import read_onnx_adapter

    model, adapters, exported, runner = llama
    source = tmp_path / "a.safetensors"
    save(adapters["a"], source)
    target = tmp_path / "a.onnx_adapter"
    main(["convert", str(source), "--to", "onnx-adapter", "-o", str(target)])
    assert onnx_adapter.detect(target) and not onnx_adapter.detect(source)
    written = read_onnx_adapter(target)
    lora = adapters["a"].component_tensors("default")
    for module, roles in lora.items():
        assert np.array_equal(written[f"{module}.lora.lora_A"], roles["lora_A"])
        assert np.allclose(written[f"{module}.lora.lora_B"], roles["lora_B"] * 8 / 4)
    with pytest.raises(AdapterError, match="no manifest"):
        onnx_adapter.read(target)
    converted = ort.LoraAdapter()
    converted.Load(str(target))
    options = ort.RunOptions()
    options.add_active_adapter(converted)
    inputs = numpy(sample_inputs(tiny_models.VOCAB))
    assert max_diff(runner.session.run(None, inputs, options)[0], runner.run(inputs, "a")["logits"]) == 0.0


# -- GPT-2 (Conv1D, fan_in_fan_out, learned positions): LoRA, BitFit and prefix, through the CLI --------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir, tmp_path_factory):
    model = load_base(tiny_gpt2_dir)
    work = tmp_path_factory.mktemp("onnx_gpt2")
    adapters = {
        "lora": tiny_models.random_lora(model, [f"transformer.h.{i}.attn.c_attn" for i in range(2)],
                                        fan_in_fan_out=True, seed=4),
        "bias": bitfit(model, [f"transformer.h.{i}.mlp.c_fc" for i in range(2)], seed=5),
        "prefix": prefix(model, [f"transformer.h.{i}.attn" for i in range(2)], kv_heads=4, head_dim=8, length=2,
                         seed=9),
    }
    paths = []
    for name, adapter in adapters.items():
        save(adapter, work / f"{name}.safetensors")
        paths.append(str(work / f"{name}.safetensors"))
    return model, adapters, work, paths


def test_cli_unmerged_with_verify_gpt2(gpt2, tiny_gpt2_dir, capsys):
    model, adapters, work, paths = gpt2
    main(["export", "--onnx", str(tiny_gpt2_dir), *paths, "--unmerged", "-o", str(work / "out"), "--verify"])
    printed = capsys.readouterr().out
    assert "verified: all 4 checks" in printed and "adapter bias" in printed and "adapter prefix" in printed
    runner = Runner(work / "out")
    inputs = sample_inputs(tiny_models.VOCAB)
    for name in ("lora", "bias", "prefix", None, "lora"):
        expected = torch_output(model, inputs, [adapters[name]] if name else [])
        assert max_diff(runner.run(numpy(inputs), name)["logits"], expected) < ATOL, name


def test_cli_merged_gpt2(gpt2, tiny_gpt2_dir, capsys):
    model, adapters, work, paths = gpt2
    main(["export", "--onnx", str(tiny_gpt2_dir), *paths[:2], "--merged", "--weights", "0.5,2", "-o",
          str(work / "m")])
    inputs = sample_inputs(tiny_models.VOCAB)
    expected = torch_output(model, inputs, [adapters["lora"], adapters["bias"]], [0.5, 2.0])
    assert max_diff(Runner(work / "m").run(numpy(inputs))["logits"], expected) < ATOL


def test_cli_refuses_an_adapter_for_another_base(gpt2, tiny_llama_dir, tmp_path, capsys):
    _, _, _, paths = gpt2
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--onnx", str(tiny_llama_dir), paths[0], "--unmerged", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert error.startswith("error:") and "another base" in error
    assert not (tmp_path / "x").exists()


# -- BERT: a classifier with a LoRA + new head adapter (unmerged), and the plain encoder (merged) ------------------


def test_bert_classifier_unmerged(tmp_path):
    classifier = tiny_models.bert_classifier()
    classifier.save_pretrained(tmp_path / "base")
    model = load_base(tmp_path / "base")
    adapters = {"sentiment": classifier_adapter(model, seed=6), "topic": classifier_adapter(model, seed=7)}
    export_onnx(tmp_path / "base", list(adapters.values()), tmp_path / "onnx", merged=False, names=list(adapters))
    runner = Runner(tmp_path / "onnx")
    inputs = sample_inputs(tiny_models.VOCAB)
    for name in ("sentiment", "topic", None):
        expected = torch_output(model, inputs, [adapters[name]] if name else [])
        assert max_diff(runner.run(numpy(inputs), name)["logits"], expected) < ATOL, name


def test_bert_encoder_merged(tiny_bert_dir, tmp_path):
    model = load_base(tiny_bert_dir)
    adapter = tiny_models.random_lora(model, [f"encoder.layer.{i}.attention.self.{m}" for i in range(2)
                                              for m in ("query", "value")], seed=8)
    export_onnx(tiny_bert_dir, [adapter], tmp_path, merged=True)
    description = json.loads((tmp_path / "adapterkit.json").read_text())
    assert description["outputs"][0]["name"] == "last_hidden_state"
    inputs = sample_inputs(tiny_models.VOCAB)
    expected = torch_output(model, inputs, [adapter])
    assert max_diff(Runner(tmp_path).run(numpy(inputs))["last_hidden_state"], expected) < ATOL
