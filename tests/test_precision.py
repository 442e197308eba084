"""Training over a frozen base held in float32, bfloat16, int8 or nf4 (``--base-precision``): the loss falls over each,
the adapter attaches to the float32 base with no ``--force``, the manifest records the full-precision base's
fingerprints and the precision; the quantized weights against hand-made references; the int8 and (on a CPU)
bfloat16 linears keep no float32 copy of their weight for the backward pass; gradient checkpointing gives every kind
the same loss and gradients over every precision."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import adapterkit
from adapterkit import precision
from adapterkit.adapter import Adapter
from adapterkit.attach import attach
from adapterkit.cli import cli
from adapterkit.example import build_example
from adapterkit.kinds import KINDS, trainable_kinds
from adapterkit.manifest import Manifest
from adapterkit.train.base import load_base
from adapterkit.train.data import Collator, load_examples
from adapterkit.train.evaluate import evaluate, example_losses
from adapterkit.train.init import new_components, option_defaults
from adapterkit.train.loop import TrainConfig, enable_gradient_checkpointing, train

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    paths = build_example(tmp_path_factory.mktemp("example"))
    lines = paths["support_casual"].read_text().splitlines()
    paths["support_sample"] = paths["support_casual"].with_name("support_sample.jsonl")
    paths["support_sample"].write_text("\n".join(lines[::20]) + "\n")
    return paths


#: every kind that trains over a base it keeps (``full`` replaces the base's tensors: nothing stays frozen)
METHODS = [name for name in trainable_kinds() if not KINDS[name].replaces]


@pytest.fixture(scope="module")
def runs(example):
    """{(method, precision): train result}: 12 steps on the tiny causal LM; {precision: loss of the base alone}."""
    held_out = load_examples(example["support_sample"])
    results, alone = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: a second thread only waits (10x slower on a loaded 2-core machine)
    try:
        _train_all(example, held_out, results, alone)
    finally:
        torch.set_num_threads(threads)
    return results, alone


def _train_all(example, held_out, results, alone):
    for name in precision.PRECISIONS:
        base = load_base(example["llama"], "causal-lm", precision=name)
        alone[name] = evaluate(base.model, base.tokenizer, held_out, "causal-lm")["loss"]
        for method in METHODS:
            config = TrainConfig(method, "causal-lm", str(example["support_casual"]), str(example["support_sample"]),
                                 steps=12, batch_size=8, lr=4e-2 if method == "ia3" else 1e-2, base_precision=name)
            results[method, name] = train(example["llama"], config, progress=False)


@pytest.fixture(scope="module")
def float32_base(example):
    base = load_base(example["llama"], "causal-lm")
    held_out = load_examples(example["support_sample"])
    return base, held_out, evaluate(base.model, base.tokenizer, held_out, "causal-lm")["loss"]


@pytest.mark.parametrize("name", precision.PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_over_each_precision_and_the_adapter_belongs_to_the_float32_base(example, runs, float32_base,
                                                                                     method, name):
    result, before = runs[0][method, name], runs[1][name]
    after = result.history[-1]["loss"]
    assert after < before - 0.02, (before, after)  # (IA)³ moves slowest: 4.22 -> 4.18
    manifest = result.adapter.manifest
    assert manifest.training["base_precision"] == name and manifest.training["method"] == method
    # the fingerprints are those of the full-precision folder, whatever the precision trained over
    assert manifest.base_model.fingerprint == adapterkit.fingerprint(example["llama"], algorithm="fp1")
    assert manifest.base_model.fingerprints == {"fp2": adapterkit.fingerprint(example["llama"])}
    assert {t.dtype.name for t in result.adapter.tensors.values()} == {"float32"}
    # attached to the float32 base, no force: it lowers that base's loss too
    base, held_out, alone = float32_base
    with attach(base.model, result.adapter):
        attached = evaluate(base.model, base.tokenizer, held_out, "causal-lm")["loss"]
    assert attached < alone - 0.02, (alone, attached)


def test_int8_and_nf4_weights_against_hand_made_references():
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    # int8: one scale per output row, symmetric over [-128, 127] (absmax / 127.5), rounded to the nearest step
    scale = weight.abs().amax(dim=1, keepdim=True) / 127.5
    reference = torch.clamp(torch.round(weight / scale), -128, 127) * scale
    int8 = precision.quantize_weight(weight, "int8")
    value = precision.dense(int8, torch.float32)
    assert bool(((value - weight).abs() <= 0.5 * scale * 1.001).all())  # within half a step of the weight
    assert (value - reference).abs().gt(1e-6).float().mean() < 0.01  # the hand-made steps, but for rare ties
    # nf4: every value within half the widest gap of the 16 NormalFloat levels times its block's absmax
    nf4 = precision.quantize_weight(weight, "nf4")
    blocks = weight.reshape(-1, precision.NF4_BLOCK).abs().amax(dim=1, keepdim=True)
    error = (precision.dense(nf4, torch.float32) - weight).reshape(-1, precision.NF4_BLOCK).abs()
    assert bool((error <= 0.17 * blocks * 1.01).all())  # widest NF4 gap: 1.0 - 0.7230 = 0.277, halved, + scale error
    assert precision.quantize_weight(torch.randn(3, 5), "nf4") is None  # not whole blocks: left in float32


@pytest.mark.parametrize("name", ["int8", "bfloat16"])
def test_held_linear_gives_the_dequantized_gradient_and_saves_no_float32_weight(name):
    torch.manual_seed(0)
    module = torch.nn.Linear(64, 32)
    counts = precision.hold(module_holder := torch.nn.Sequential(module), name)  # bfloat16 on a CPU: held
    assert counts == {"quantized": 1, "bfloat16": 0, "kept": 0} and isinstance(module_holder[0], torch.nn.Linear)
    dequantized = precision.dense(module.weight, torch.float32)
    x = torch.randn(4, 7, 64, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    weights = [t for t in saved if t.shape == (32, 64)]
    assert weights and all(precision.is_quantized(t) or t.dtype == torch.bfloat16 for t in weights), saved  # held
    y.pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, dequantized, module.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(y, F.linear(x_ref, dequantized, module.bias.detach()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_evaluate_over_a_precision_and_a_bad_precision_is_one_line(example, runs, tmp_path):
    path = tmp_path / "nf4.safetensors"
    adapterkit.save(runs[0]["lora", "nf4"].adapter, path)
    common = ["evaluate", str(example["llama"]), str(path), "--data", str(example["support_sample"]), "--json"]
    result = CliRunner().invoke(cli, [*common, "--base-precision", "nf4"])
    assert result.exit_code == 0, result.output
    # the loss training reported at its last evaluation, over the same nf4 base
    assert json.loads(result.stdout)["loss"] == pytest.approx(runs[0]["lora", "nf4"].history[-1]["loss"], rel=1e-4)
    bad = CliRunner().invoke(cli, [*common, "--base-precision", "fp3"])
    assert bad.exit_code == 2 and "fp3" in bad.output


@pytest.fixture(scope="module")
def held_bases(example):
    """{precision: loaded base}, loaded on first use."""
    return {}


@pytest.mark.parametrize("name", precision.PRECISIONS)
@pytest.mark.parametrize("method", trainable_kinds())
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(example, held_bases, method, name):
    if name not in held_bases:
        held_bases[name] = load_base(example["llama"], "causal-lm", precision=name)
    loaded = held_bases[name]
    model = loaded.model.requires_grad_(False).train()
    examples = load_examples(example["support_sample"])
    batch = Collator(examples, loaded.tokenizer)(list(range(4)))
    components, tensors = new_components(model, method, options=option_defaults(),
                                         generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    tensors = {key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in tensors.items()}
    calls, mlp = [], model.model.layers[0].mlp  # checkpointing runs the layer's modules again in the backward pass
    mlp.forward = lambda *args, forward=mlp.forward: calls.append(1) or forward(*args)  # (torch skips their hooks)
    runs = []
    try:
        with attach(model, Adapter(Manifest(components=components), tensors), trainable=True,
                    dtype=torch.float32) as handle:
            for checkpointing in (False, True):
                if checkpointing:
                    enable_gradient_checkpointing(model)
                calls.clear()
                torch.manual_seed(0)
                losses, _ = example_losses(model, batch, "causal-lm")
                losses.mean().backward()
                runs.append((losses.detach(), [p.grad.clone() for p in handle.parameters()], len(calls)))
                for parameter in handle.parameters():
                    parameter.grad = None
    finally:
        del mlp.forward
        model.activation_checkpointing_disable()
    (loss, grads, calls_without), (loss_checkpointed, grads_checkpointed, calls_with) = runs
    assert (calls_without, calls_with) == (1, 2)  # checkpointing was on: the layer ran again for the backward pass
    assert torch.allclose(loss, loss_checkpointed, rtol=1e-5, atol=1e-6)
    assert sum(g.abs().sum() for g in grads) > 0  # gradients reach the adapter
    for plain, checkpointed in zip(grads, grads_checkpointed, strict=True):
        assert torch.allclose(plain, checkpointed, rtol=1e-4, atol=1e-6), (plain - checkpointed).abs().max()


def test_train_gradient_checkpointing_option_is_recorded(example, tmp_path):
    path = tmp_path / "checkpointed.safetensors"
    result = CliRunner().invoke(cli, ["train", str(example["llama"]), "--data", str(example["support_sample"]),
                                      "--steps", "2", "--batch-size", "4", "--base-precision", "nf4",
                                      "--gradient-checkpointing", "-o", str(path)])
    assert result.exit_code == 0, result.output
    training = adapterkit.load(path).manifest.training
    assert training["gradient_checkpointing"] is True and training["base_precision"] == "nf4"


HELD_FORMATS = ["bfloat16", "int8", "nf4"]


@pytest.mark.parametrize("name", HELD_FORMATS)
@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_a_held_model_computes_what_float32_computes_over_its_held_values(family, name):
    """The embeddings and the pretrained head held in bfloat16 (gemma's and GPT-2's tied to each other, one parameter
    still), the body's linear layers in the precision: the logits and the gradient reaching the hidden states are
    those of the float32 model given each held weight's value (a plain torch forward, no held module)."""
    import copy

    from tests import tiny_models

    model = tiny_models.gpt2() if family == "gpt2" else tiny_models.causal_lm(family)
    reference = copy.deepcopy(model)
    counts = precision.hold(model.requires_grad_(False), name)
    embeddings = model.get_input_embeddings()
    assert embeddings.weight.dtype == torch.bfloat16 and counts["bfloat16"] >= 1
    if family == "llama":  # an untied head is held on its own, in bfloat16, never quantized
        assert model.lm_head.weight.dtype == torch.bfloat16 and not precision.is_quantized(model.lm_head.weight)
    else:
        assert model.lm_head.weight is embeddings.weight  # still tied
    held = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, parameter in reference.named_parameters(remove_duplicate=False):
            parameter.copy_(precision.dense(held[key], torch.float32))
    if family == "gemma":  # Gemma's own forward scales the rows by sqrt(hidden) in the table's dtype, bfloat16
        scaled = reference.get_input_embeddings()
        scaled.embed_scale = scaled.embed_scale.to(torch.bfloat16).float()
    ids = torch.randint(0, tiny_models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    outputs = []
    for each in (model, reference):
        hidden = []
        handle = each.get_input_embeddings().register_forward_hook(  # the rows, as a leaf to take a gradient at
            lambda module, args, out: hidden.append(out.detach().requires_grad_(True)) or hidden[-1])
        logits = each(input_ids=ids).logits
        handle.remove()
        logits.pow(2).mean().backward()
        outputs.append((logits.detach(), hidden[0].dtype, hidden[0].grad))
    (logits, dtype, grad), (logits_ref, _, grad_ref) = outputs
    assert dtype == torch.float32  # the held embedding gives float32 rows
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", HELD_FORMATS)
def test_a_held_weight_is_converted_a_block_of_rows_at_a_time(name, monkeypatch):
    """A product over a weight larger than CONVERT_BYTES converts it a block at a time (no float32 copy of more
    than CONVERT_BYTES), and gives the whole product and input gradient."""
    torch.manual_seed(0)
    module = torch.nn.Linear(256, 640)
    precision.hold(torch.nn.Sequential(module), name)
    whole = precision.dense(module.weight, torch.float32)
    monkeypatch.setattr(precision, "CONVERT_BYTES", 256 * 4 * 64)  # at most 64 rows in float32 at once
    converted, dense = [], precision.dense
    monkeypatch.setattr(precision, "dense", lambda tensor, dtype=None: converted.append(tensor.shape[0]) or
                        dense(tensor, dtype))
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = module(x)
    y.pow(2).sum().backward()
    assert len(converted) >= 2 * 10 and max(converted) <= 64, converted  # forward and backward, in blocks
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, whole, module.bias.detach())
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # inference takes the same blocks
        torch.testing.assert_close(module(x), y_ref, rtol=1e-5, atol=1e-5)


def _mapped_file_kb(path) -> int:
    """Kilobytes of ``path``'s mappings resident in this process (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) == 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_a_converted_weight_leaves_the_mapped_checkpoint_pages_and_loses_nothing(tmp_path):
    """transformers loads a safetensors checkpoint as views of the mapped file; once a weight is converted its
    pages leave the resident set (holding a base no longer peaks at the float32 file's size) and, read again,
    come back from the file unchanged."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    checkpoint = (tmp_path / "model.safetensors").resolve()
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    weight = model.model.layers[0].mlp.up_proj.weight.detach()  # 1 MB of float32
    files = precision.MappedFiles()
    if not any(start <= weight.data_ptr() < end for start, end in files.ranges):
        pytest.skip("this transformers copies the checkpoint's tensors instead of mapping the file")
    for parameter in model.parameters():
        parameter.sum()  # every page read, as converting does
    before = _mapped_file_kb(checkpoint)
    files.release(weight)
    after = _mapped_file_kb(checkpoint)
    assert before - after >= weight.numel() * 4 // 1024 - 8, (before, after)  # its whole pages left
    assert torch.equal(weight, load_file(checkpoint)["model.layers.0.mlp.up_proj.weight"])  # read again, unchanged
    held = precision.hold(model.requires_grad_(False), "nf4")
    assert held["quantized"] == 7 and _mapped_file_kb(checkpoint) < before // 4  # holding released them all


def test_a_held_model_without_its_folder_is_refused_unless_forced(example, float32_base):
    """A model held quantized gives no fingerprint back: attach without ``reference`` refuses in one line, naming what
    to pass; against its folder it is checked; with ``force`` it goes on without a check, and the adapter acts."""
    from adapterkit import BaseModel
    from adapterkit.errors import RequestError

    loaded = load_base(example["llama"], "causal-lm", precision="nf4")
    held = loaded.model
    components, tensors = new_components(held, "lora", options=option_defaults(),
                                         generator=torch.Generator().manual_seed(0))
    tensors = {name: value + 0.1 for name, value in tensors.items()}  # B is zero at first: make it act
    adapter = Adapter(Manifest(components, BaseModel("llama", None, None,
                                                     {"fp2": adapterkit.fingerprint(example["llama"])})), tensors)
    with pytest.raises(RequestError, match="held quantized.*reference=folder"):
        attach(held, adapter)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        alone = held(input_ids=ids).logits
        with attach(held, adapter, reference=example["llama"]):
            checked = held(input_ids=ids).logits
        with attach(held, adapter, force=True):
            forced = held(input_ids=ids).logits
    assert not torch.allclose(checked, alone) and torch.equal(checked, forced)
