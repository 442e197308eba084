"""One contract over every registered kind (as PEFT's tests/testing_common.py runs every method through one matrix).

A kind gets all of it by registering: each kind's adapter is made generically (its runtime's default targets and
initial tensors on the model, then every tensor randomised so that it does something), and run on a tiny Llama,
GPT-2 and BERT through:

- save / load / validate, bit for bit;
- attach against an independent reference in float64: the base with the adapter merged (kinds that merge) or, for
  the kinds PEFT has, PEFT's own model loaded from what we write;
- detach, which gives the model back bit for bit (same objects, same values);
- merge against attach, and unmerge back to the base (or the refusal, for a kind that cannot be merged or undone);
- compose with itself: [a, a] with weights ½, ½ is a (weighted kinds), [a] alone is a (the others), or a refusal;
- the unmerged ONNX graph (one per model, an adapter of every kind in it) with the adapter active against attach,
  and with none against the base;
- the PEFT round trip where PEFT has the kind (a kind PEFT only carries inside another method rides on a LoRA);
- training: the loss falls when only the adapter's tensors are trained.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from adapterkit import Adapter, BaseModel, Manifest, fingerprint, load, save
from adapterkit.attach import attach
from adapterkit.compose import compose
from adapterkit.errors import RequestError
from adapterkit.kinds import KINDS, get_kind
from adapterkit.merge import merge_into_model, unmerge_from_model
from adapterkit.train.init import new_components, option_defaults
from test_attach import assert_restored, snapshot

MODELS = tiny_models.MODELS
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 8, 15, 16, 23, 42, 99, 127]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])
CASES = [(kind, model) for kind in KINDS for model in MODELS]


def output(model, mask=MASK) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=IDS, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def random_adapter(kind: str, model: torch.nn.Module, seed: int = 0) -> Adapter:
    """An adapter of ``kind`` on ``model``'s default targets, its tensors randomised (a trained adapter's stand-in):
    every kind's untrained start is (close to) the base, which would make every check pass vacuously."""
    generator = torch.Generator().manual_seed(seed)
    components, tensors = new_components(model, kind, options=option_defaults(), generator=generator)
    randomised = {name: value + torch.randn(value.shape, generator=generator, dtype=value.dtype) * 0.1
                  for name, value in tensors.items()}
    replaced = [t for c in components for t in get_kind(c.kind).replaced_targets(c)]
    return Adapter(Manifest(components, BaseModel("tiny", None, fingerprint(model, exclude=replaced))), randomised)


@pytest.fixture(params=CASES, ids=[f"{kind}-{model}" for kind, model in CASES])
def case(request):
    kind, name = request.param
    model = MODELS[name]()
    return kind, name, model, random_adapter(kind, model)


def test_save_load_validate_round_trip(case, tmp_path):
    _, _, _, adapter = case
    save(adapter, tmp_path / "a.safetensors")
    loaded = load(tmp_path / "a.safetensors")
    assert loaded.manifest.to_json() == adapter.manifest.to_json()
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for name, tensor in adapter.tensors.items():
        assert np.array_equal(loaded.tensors[name], tensor) and loaded.tensors[name].dtype == tensor.dtype


def test_attach_changes_the_output_and_detach_restores_the_model_bit_for_bit(case):
    _, _, model, adapter = case
    before, base_output = snapshot(model), output(model)
    with attach(model, adapter):
        attached = output(model)
    assert not torch.allclose(attached, base_output, atol=1e-4), "the randomised adapter must change the output"
    assert_restored(model, before)
    assert torch.equal(output(model), base_output)


def test_merge_equals_attach_in_float64_and_unmerge_restores(case):
    kind, name, model, adapter = case
    model = model.double()
    with attach(model, adapter):
        attached = output(model)
    if get_kind(kind).unmergeable:
        with pytest.raises(RequestError, match="attach it"):
            merge_into_model(model, [adapter])
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        merge_into_model(model, [adapter])
    except RequestError as exc:  # only where the base lacks the tensor the kind changes (BitFit on Llama: no biases)
        missing = exc.reason.removeprefix("the adapter changes ").split(",")[0]
        assert "which the base does not have" in exc.reason and missing not in before
        return
    torch.testing.assert_close(output(model), attached, atol=1e-9, rtol=1e-9)
    if get_kind(kind).replaces:
        with pytest.raises(RequestError, match="cannot be unmerged"):
            unmerge_from_model(model, [adapter])
        return
    unmerge_from_model(model, [adapter])
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[key], atol=1e-12, rtol=0)


def test_compose_with_itself(case):
    kind, _, model, adapter = case
    with attach(model, adapter):
        reference = output(model)
    try:
        composite = compose([adapter, adapter], [0.5, 0.5]) if get_kind(kind).weighted else compose([adapter])
    except RequestError as exc:  # a kind that does not compose says so in its own words
        assert "cannot be composed" in exc.reason
        return
    with attach(model, composite):
        torch.testing.assert_close(output(model), reference, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def onnx_graphs(tiny_dirs, tmp_path_factory):
    """Unmerged ONNX graphs per model holding an adapter of every kind (exported on first use), with their runners:
    each case activates its own kind's adapter, every other slot at its default. Kinds share a graph unless the
    exporter refuses them together (a full replacement of a weight a DoRA slot reads), then the rest start another."""
    from adapterkit.onnx.export import export_onnx, load_base
    from adapterkit.onnx.runner import Runner
    from adapterkit.onnx.slots import adapter_feeds, check_slots

    graphs = {}

    def graph(name: str):
        if name not in graphs:
            model = load_base(tiny_dirs[name])  # sdpa attention, as the export loads it
            adapters = {kind: random_adapter(kind, model) for kind in KINDS}
            groups: list[dict] = []
            for kind, adapter in adapters.items():
                for group in groups:
                    try:
                        check_slots({s for a in [*group.values(), adapter] for s in adapter_feeds(a, 1.0, model)})
                    except RequestError:
                        continue
                    group[kind] = adapter
                    break
                else:
                    groups.append({kind: adapter})
            runners = {}
            for number, group in enumerate(groups):
                folder = tmp_path_factory.mktemp(f"onnx-{name}-{number}") / "onnx"
                export_onnx(tiny_dirs[name], list(group.values()), folder, merged=False, names=list(group))
                runners.update(dict.fromkeys(group, Runner(folder)))
            graphs[name] = model, adapters, runners
        return graphs[name]

    return graph


def test_unmerged_onnx_graph_equals_attach(case, onnx_graphs):
    kind, name, _, _ = case
    model, adapters, runners = onnx_graphs(name)
    runner = runners[kind]
    inputs = {"input_ids": IDS.numpy(), "attention_mask": MASK.numpy()}
    field = runner.output_names[0]
    with attach(model, adapters[kind]):
        expected = output(model)
    rows = MASK.bool()  # padded positions of a causal LM are not compared (their values are not defined)
    actual = torch.from_numpy(runner.run(inputs, kind)[field])
    torch.testing.assert_close(actual[rows], expected[rows], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(runner.run(inputs)[field])[rows], output(model)[rows], atol=1e-4,
                               rtol=0)


def test_peft_round_trip_where_peft_has_the_kind(case, tiny_dirs, tmp_path):
    from peft import PeftModel

    from adapterkit.converters import peft as peft_format

    kind, name, model, adapter = case
    mapping = get_kind(kind).peft
    if mapping is None:
        pytest.skip(f"PEFT has no {kind} kind")
    if not hasattr(mapping, "PEFT_TYPE"):  # PEFT carries it inside another method's files: ride on a LoRA
        lora = random_adapter("lora", model, seed=1)
        adapter = Adapter(Manifest(lora.components + adapter.components, adapter.manifest.base_model),
                          {**lora.tensors, **adapter.tensors})
    with attach(model, adapter):
        expected = output(model)
    try:
        peft_format.write(adapter, tmp_path / "peft", base=tiny_dirs[name])
    except RequestError as exc:  # refused before anything is written, never a folder PEFT cannot load
        assert not (tmp_path / "peft").exists()
        pytest.skip(f"PEFT cannot hold this adapter on {name}: {exc.reason}")
    peft_model = PeftModel.from_pretrained(MODELS[name](), tmp_path / "peft").eval()
    rows = MASK.bool()
    torch.testing.assert_close(output(peft_model)[rows], expected[rows], atol=1e-5, rtol=0)
    back = peft_format.read(tmp_path / "peft", base=tiny_dirs[name])
    with attach(model, back):
        torch.testing.assert_close(output(model)[rows], expected[rows], atol=1e-5, rtol=0)


def test_training_only_the_adapter_makes_the_loss_fall(case):
    kind, _, model, _ = case
    model.requires_grad_(False)
    components, tensors = new_components(model, kind, options=option_defaults(),
                                         generator=torch.Generator().manual_seed(0))
    adapter = Adapter(Manifest(components, BaseModel()), tensors)
    target = torch.randn(output(model).shape, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    with attach(model, adapter, trainable=True) as handle:
        optimizer = torch.optim.Adam(list(handle.parameters()), lr=get_kind(kind).default_lr)
        losses = []
        for _ in range(12):
            result = model(input_ids=IDS, attention_mask=MASK)
            prediction = result.logits if hasattr(result, "logits") else result.last_hidden_state
            loss = (prediction - target).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        trained = handle.to_adapters()[0]
    assert losses[-1] < losses[0] * 0.999, losses
    assert_restored(model, before)  # only the adapter's own tensors moved
    assert any(not np.array_equal(trained.tensors[n], adapter.tensors[n]) for n in adapter.tensors)

