"""compose: exact concat, factor-only SVD compression, TIES/DARE, composites across kinds, CLI refusals.

References: Σ wᵢ sᵢ Bᵢ Aᵢ computed by hand in float64, PEFT's add_weighted_adapter ("cat", "svd") on a PeftModel holding
the same tensors, PEFT's merge_utils.ties on the same deltas, and singular values of the exact sum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tiny_models
from adapterkit import Adapter, AdapterError, BaseModel, Component, Manifest, fingerprint, load, save
from adapterkit.adapter import tensor_name
from adapterkit.arrays import to_torch
from adapterkit.cli import main
from adapterkit.compose import compose
from adapterkit.errors import RequestError
from adapterkit.io.digest import sha256_of
from adapterkit.kinds.lora import scale

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN0 = "model.layers.0.mlp.down_proj"
UP1 = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def llama():
    return tiny_models.llama()


@pytest.fixture(scope="module")
def two_loras(llama):
    """Different ranks, scalings and (overlapping) target sets."""
    a = tiny_models.random_lora(llama, [Q0, V1, UP1], rank=4, alpha=8.0, seed=1)
    b = tiny_models.random_lora(llama, [Q0, DOWN0, UP1], rank=6, alpha=4.0, seed=2, scaling="rslora")
    return a, b


def exact_sum(adapters, weights) -> dict[str, torch.Tensor]:
    """Σ wᵢ sᵢ Bᵢ Aᵢ per target, by hand in float64, math layout [out, in]."""
    total: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights):
        component = adapter.components[0]
        for target, roles in adapter.component_tensors(component.name).items():
            a, b = to_torch(roles["lora_A"]).double(), to_torch(roles["lora_B"]).double()
            s = scale(a.shape[0], component.params["alpha"], component.params["scaling"])
            total[target] = total.get(target, 0) + weight * s * (b @ a)
    return total


def weight_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The LoRA ΔW per target, as merge computes it from the file's tensors (stored layout, float64)."""
    out = {}
    for component in (c for c in adapter.components if c.kind == "lora"):
        for target, roles in adapter.component_tensors(component.name).items():
            out[target] = out.get(target, 0) + tiny_models.merged_delta(component, target, roles).double()
    return out


def peft_model_with(model, adapters: dict[str, Adapter]):
    """A PeftModel holding ``adapters`` (name -> our LoRA) with exactly our tensors."""
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for name, adapter in adapters.items():
        component = adapter.components[0]
        config = LoraConfig(r=component.params["rank"], lora_alpha=component.params["alpha"], lora_dropout=0.0,
                            target_modules=list(component.targets), use_rslora=component.params["scaling"] == "rslora")
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        for target, roles in adapter.component_tensors(component.name).items():
            module = peft_model.base_model.model.get_submodule(target)
            module.lora_A[name].weight.data.copy_(to_torch(roles["lora_A"]))
            module.lora_B[name].weight.data.copy_(to_torch(roles["lora_B"]))
    return peft_model


def peft_deltas(peft_model, name: str, targets) -> dict[str, torch.Tensor]:
    return {t: peft_model.base_model.model.get_submodule(t).get_delta_weight(name).double() for t in targets}


# --- concat ---------------------------------------------------------------------------------------------------------


def test_concat_is_the_exact_weighted_sum_with_scales_folded_into_B(two_loras):
    weights = [0.7, -1.3]
    composite = compose(two_loras, weights)
    expected = exact_sum(two_loras, weights)
    got = weight_deltas(composite)
    assert got.keys() == expected.keys()
    for target in expected:
        torch.testing.assert_close(got[target], expected[target], atol=1e-6, rtol=0)
    component = composite.components[0]
    ranks = {t: int(r["lora_A"].shape[0]) for t, r in composite.component_tensors(component.name).items()}
    assert ranks == {Q0: 10, UP1: 10, V1: 4, DOWN0: 6}
    assert all(component.param(t, "alpha") == ranks[t] for t in ranks)  # s = 1
    assert component.params["scaling"] == "standard"
    assert composite.manifest.composition["error"] == {"relative": 0.0, "absolute": 0.0}


def test_concat_matches_peft_add_weighted_adapter_cat(two_loras):
    weights = [0.6, -0.4]
    peft_model = peft_model_with(tiny_models.llama(), {"first": two_loras[0], "second": two_loras[1]})
    peft_model.add_weighted_adapter(["first", "second"], weights, "mix", combination_type="cat")
    ours = weight_deltas(compose(two_loras, weights))
    theirs = peft_deltas(peft_model, "mix", ours)
    for target in ours:
        torch.testing.assert_close(ours[target], theirs[target], atol=1e-6, rtol=0)


def test_concat_keeps_the_fan_in_fan_out_layout_of_gpt2_conv1d():
    gpt2 = tiny_models.gpt2()
    targets = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    a = tiny_models.random_lora(gpt2, targets, rank=2, seed=3, fan_in_fan_out=True)
    b = tiny_models.random_lora(gpt2, targets[:1], rank=3, seed=4, fan_in_fan_out=True)
    composite = compose([a, b], [2.0, 0.5])
    assert composite.components[0].params["fan_in_fan_out"] is True
    separate_a, separate_b = weight_deltas(a), weight_deltas(b)
    got = weight_deltas(composite)
    for target in targets:
        expected = 2.0 * separate_a[target] + (0.5 * separate_b[target] if target in separate_b else 0)
        assert got[target].shape == gpt2.get_submodule(target).weight.shape  # stored layout [in, out]
        torch.testing.assert_close(got[target], expected, atol=1e-6, rtol=0)


# --- svd ------------------------------------------------------------------------------------------------------------


def test_svd_is_no_worse_than_peft_svd_and_records_the_measured_error(two_loras):
    weights, rank = [1.0, 0.5], 3
    composite = compose(two_loras, weights, method="svd", rank=rank)
    peft_model = peft_model_with(tiny_models.llama(), {"first": two_loras[0], "second": two_loras[1]})
    peft_model.add_weighted_adapter(["first", "second"], weights, "mix", combination_type="svd", svd_rank=rank)
    exact, ours = exact_sum(two_loras, weights), weight_deltas(composite)
    theirs = peft_deltas(peft_model, "mix", exact)
    error = composite.manifest.composition["error"]
    for target in exact:
        our_error = torch.linalg.matrix_norm(exact[target] - ours[target]).item()
        peft_error = torch.linalg.matrix_norm(exact[target] - theirs[target]).item()
        assert our_error <= peft_error * (1 + 1e-5) + 1e-6, target
        recorded = error["per_target"][target]
        assert recorded["rank"] == rank
        assert recorded["absolute"] == pytest.approx(our_error, abs=1e-5)
        assert recorded["relative"] == pytest.approx(our_error / torch.linalg.matrix_norm(exact[target]).item(),
                                                     abs=1e-5)
    total_error = math.sqrt(sum(torch.linalg.matrix_norm(exact[t] - ours[t]).item() ** 2 for t in exact))
    total_norm = math.sqrt(sum(torch.linalg.matrix_norm(exact[t]).item() ** 2 for t in exact))
    assert error["absolute"] == pytest.approx(total_error, abs=1e-5)
    assert error["relative"] == pytest.approx(total_error / total_norm, abs=1e-5)
    assert error["relative"] > 0.01  # rank 3 < the ranks 4..10 of the sums: a real truncation


def test_svd_at_full_rank_is_exact(two_loras):
    composite = compose(two_loras, [1.0, -1.0], method="svd", rank=10)
    exact, got = exact_sum(two_loras, [1.0, -1.0]), weight_deltas(composite)
    for target in exact:
        torch.testing.assert_close(got[target], exact[target], atol=1e-6, rtol=0)
    assert composite.manifest.composition["error"]["relative"] < 1e-6


def test_tol_picks_per_target_the_smallest_rank_meeting_it(tmp_path, two_loras):
    tol = 0.25
    composite = compose(two_loras, [1.0, 1.0], method="svd", tol=tol)
    save(composite, tmp_path / "tol.safetensors")
    loaded = load(tmp_path / "tol.safetensors")
    exact, got = exact_sum(two_loras, [1.0, 1.0]), weight_deltas(loaded)
    ranks = {}
    for target in exact:
        norm = torch.linalg.matrix_norm(exact[target]).item()
        assert torch.linalg.matrix_norm(exact[target] - got[target]).item() <= tol * norm + 1e-6
        sigma = torch.linalg.svdvals(exact[target])
        rank = int(loaded.component_tensors(loaded.components[0].name)[target]["lora_A"].shape[0])
        ranks[target] = rank
        one_less = sigma[rank - 1:].square().sum().sqrt().item()  # the error of keeping rank - 1 values
        assert rank == 1 or one_less > tol * norm, target
    assert len(set(ranks.values())) > 1  # ranks differ per target: target_params carry them
    assert loaded.manifest.composition["tolerance"] == tol


# --- ties and dare --------------------------------------------------------------------------------------------------


def test_ties_equals_peft_ties_on_the_weighted_deltas_then_compresses(two_loras):
    from peft.utils.merge_utils import ties

    weights, density = [1.0, 0.5], 0.3
    full_rank = 32  # min(out, in) of every target: the re-factorisation is exact
    composite = compose(two_loras, weights, method="ties", density=density, rank=full_rank)
    got = weight_deltas(composite)
    for target in got:
        per_input = [w * exact_sum([a], [1.0])[target] for a, w in zip(two_loras, weights)
                     if target in a.components[0].targets]
        expected = ties(per_input, torch.ones(len(per_input), dtype=torch.float64), density)
        torch.testing.assert_close(got[target], expected, atol=1e-6, rtol=0)
    assert composite.manifest.composition["density"] == density


def test_dare_drops_and_rescales_reproducibly_by_seed(llama):
    a = tiny_models.random_lora(llama, [Q0, DOWN0], rank=4, seed=5)
    exact = exact_sum([a], [1.0])
    first = weight_deltas(compose([a], method="dare", density=0.25, rank=64, seed=7))
    again = weight_deltas(compose([a], method="dare", density=0.25, rank=64, seed=7))
    other = weight_deltas(compose([a], method="dare", density=0.25, rank=64, seed=8))
    for target in exact:
        kept = first[target].abs() > 1e-6  # above the float32 noise of the stored factors
        # every entry is either dropped or the original divided by the density
        torch.testing.assert_close(first[target][kept], exact[target][kept] / 0.25, atol=1e-5, rtol=0)
        assert first[target][~kept].abs().max() < 1e-6
        assert 0.15 < kept.double().mean().item() < 0.35
        torch.testing.assert_close(first[target], again[target], atol=0, rtol=0)
        assert not torch.allclose(first[target], other[target])


def test_dare_with_density_one_is_the_plain_weighted_sum(two_loras):
    got = weight_deltas(compose(two_loras, [0.5, 2.0], method="dare", density=1.0, rank=32))
    exact = exact_sum(two_loras, [0.5, 2.0])
    for target in exact:
        torch.testing.assert_close(got[target], exact[target], atol=1e-6, rtol=0)


# --- composites across kinds ----------------------------------------------------------------------------------------


def make_adapter(model, kind, tensors_by_target, params=None, name="default"):
    tensors = {tensor_name(name, t, role): x for t, roles in tensors_by_target.items() for role, x in roles.items()}
    manifest = Manifest(components=[Component(name, kind, list(tensors_by_target), params or {})],
                        base_model=BaseModel("tiny", None, fingerprint(model)))
    return Adapter(manifest, tensors)


def random_prefix(model, length, seed):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    shape = (config.num_key_value_heads, length, config.hidden_size // config.num_attention_heads)
    attention = {f"model.layers.{i}.self_attn": {"prefix_key": torch.randn(shape, generator=generator),
                                                 "prefix_value": torch.randn(shape, generator=generator)}
                 for i in range(config.num_hidden_layers)}
    return make_adapter(model, "prefix", attention, {"prefix_length": length})


def random_bitfit(model, targets, seed):
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return make_adapter(model, "bitfit", {
        t: {"bias": torch.randn(modules[t].weight.shape[0], generator=generator)} for t in targets})


def test_lora_bitfit_prefix_and_head_compose_into_one_file(tmp_path, llama, two_loras):
    lora = two_loras[0]
    bitfit_a, bitfit_b = random_bitfit(llama, [Q0, V1], 11), random_bitfit(llama, [Q0, DOWN0], 12)
    prefix_a, prefix_b = random_prefix(llama, 3, 13), random_prefix(llama, 2, 14)
    head = make_adapter(llama, "full", {"lm_head": {"weight": torch.randn(tiny_models.VOCAB, 32)}})
    composite = compose([lora, bitfit_a, bitfit_b, prefix_a, prefix_b, head], [0.5, 2.0, -1.0, 1, 1, 1], name="mix")
    save(composite, tmp_path / "mix.safetensors")
    loaded = load(tmp_path / "mix.safetensors")
    assert [(c.name, c.kind) for c in loaded.components] == [
        ("mix_lora", "lora"), ("mix_bitfit", "bitfit"), ("mix_prefix", "prefix"), ("mix_full", "full")]
    biases = {t: tiny_models.torch_roles(roles) for t, roles in loaded.component_tensors("mix_bitfit").items()}
    bias = lambda adapter, t: to_torch(adapter.component_tensors("default")[t]["bias"])  # noqa: E731
    torch.testing.assert_close(biases[Q0]["bias"], 2.0 * bias(bitfit_a, Q0) - bias(bitfit_b, Q0))
    torch.testing.assert_close(biases[V1]["bias"], 2.0 * bias(bitfit_a, V1))
    torch.testing.assert_close(biases[DOWN0]["bias"], -bias(bitfit_b, DOWN0))
    prefix = loaded.component("mix_prefix")
    assert prefix.params["prefix_length"] == 5
    for target, roles in loaded.component_tensors("mix_prefix").items():
        for role in ("prefix_key", "prefix_value"):
            parts = [p.component_tensors("default")[target][role] for p in (prefix_a, prefix_b)]
            assert np.array_equal(roles[role], np.concatenate(parts, axis=1))
    assert np.array_equal(loaded.component_tensors("mix_full")["lm_head"]["weight"],
                          head.component_tensors("default")["lm_head"]["weight"])
    for target, delta in exact_sum([lora], [0.5]).items():
        torch.testing.assert_close(weight_deltas(loaded)[target], delta, atol=1e-6, rtol=0)
    assert [s["weight"] for s in loaded.manifest.composition["sources"]] == [0.5, 2.0, -1.0, 1, 1, 1]


def test_refusals_across_kinds(llama):
    prefix, head = random_prefix(llama, 2, 1), make_adapter(llama, "full", {"lm_head": {"weight": torch.ones(128, 32)}})
    with pytest.raises(AdapterError, match="prefix with weight 0.5"):
        compose([prefix], [0.5])
    other_head = make_adapter(llama, "full", {"lm_head": {"weight": torch.zeros(128, 32)}})
    with pytest.raises(AdapterError, match="different lm_head.weight tensors"):
        compose([head, other_head])
    compose([head, head])  # the same head twice is fine


def test_a_lora_plus_prefixes_composite_attached_equals_attaching_them_separately(llama, two_loras):
    from adapterkit.attach import attach

    lora, prefix_a, prefix_b = two_loras[0], random_prefix(llama, 3, 21), random_prefix(llama, 2, 22)
    weights = [0.5, 1.0, 1.0]
    composite = compose([lora, prefix_a, prefix_b], weights)
    ids = torch.randint(0, tiny_models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = llama(ids).logits
        with attach(llama, [lora, prefix_a, prefix_b], weights):
            separately = llama(ids).logits
        with attach(llama, composite):
            together = llama(ids).logits
        torch.testing.assert_close(llama(ids).logits, plain, atol=0, rtol=0)  # detached again
    assert not torch.allclose(plain, separately, atol=1e-3)
    torch.testing.assert_close(together, separately, atol=1e-5, rtol=1e-5)


# --- the command line -----------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["compose", *map(str, argv)])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama, two_loras):
    folder = tmp_path_factory.mktemp("compose_cli")
    paths = {"a": folder / "a.safetensors", "b": folder / "b.safetensors"}
    save(two_loras[0], paths["a"])
    save(two_loras[1], paths["b"])
    other_base = tiny_models.random_lora(tiny_models.llama(seed=1), [Q0], rank=4, seed=1)
    save(other_base, folder / "other_base.safetensors")
    k_proj = tiny_models.random_lora(llama, ["model.layers.0.self_attn.k_proj"], rank=2, seed=9)
    renamed = {name.replace("k_proj", "q_proj"): t for name, t in k_proj.tensors.items()}
    k_proj.manifest.components[0].targets = [Q0]
    save(Adapter(k_proj.manifest, renamed), folder / "wrong_shape.safetensors")
    paths.update(other_base=folder / "other_base.safetensors", wrong_shape=folder / "wrong_shape.safetensors",
                 out=folder / "out.safetensors")
    return paths


def test_cli_composes_prints_errors_and_records_the_sources(capsys, files, two_loras):
    code, out, err = run_cli(capsys, files["a"], files["b"], "--weights", "0.7,-0.3", "--method", "svd",
                             "--rank", "3", "-o", files["out"])
    assert code == 0, err
    assert "relative Frobenius error" in out and Q0 in out
    composition = load(files["out"]).manifest.composition
    assert composition["sources"] == [
        {"name": "a.safetensors", "sha256": sha256_of(files["a"]), "weight": 0.7},
        {"name": "b.safetensors", "sha256": sha256_of(files["b"]), "weight": -0.3},
    ]
    assert composition["method"] == "svd" and composition["rank"] == 3
    assert f"{composition['error']['relative']:.3e}" in out


@pytest.mark.parametrize("argv, message", [
    (["a", "other_base"], "made for another base model"),
    (["a", "wrong_shape"], "shapes disagree"),
    (["a", "b", "--rank", "4"], "--rank does not apply to concat (it is exact"),
    (["a", "b", "--method", "ties"], "ties needs --density"),
    (["a", "b", "--method", "svd", "--rank", "2", "--tol", "0.1"], "either a rank or a tolerance"),
])
def test_cli_refusals_are_one_line_and_exit_1(capsys, files, argv, message):
    argv = [str(files[a]) if a in files else a for a in argv]
    code, out, err = run_cli(capsys, *argv, "-o", files["out"].with_name("refused.safetensors"))
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not files["out"].with_name("refused.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (["a", "b", "--weights", "1,2,3"], "gives 3 weights for 2 adapters"),
    (["a", "b", "--weights", "1,x"], "entry 'x' must be a number"),
    (["a", "b", "--weights", "nan,1"], "must be a finite number"),
    (["a", "--method", "average"], "'average' is not one of"),
    (["a", "b", "--method", "svd", "--rank", "0"], "0 is not in the range x>=1"),
    (["a", "b", "--method", "svd", "--tol", "inf"], "must be a finite number"),
    (["a", "b", "--method", "ties", "--density", "0"], "must be in (0, 1]"),
])
def test_cli_bad_option_values_are_usage_errors(capsys, files, argv, message):
    """Bad option values are refused before any work, the click way: a usage line, the reason, exit 2."""
    argv = [str(files[a]) if a in files else a for a in argv]
    code, _, err = run_cli(capsys, *argv, "-o", files["out"].with_name("refused.safetensors"))
    assert code == 2 and err.startswith("Usage: ") and message in err, err
    assert not files["out"].with_name("refused.safetensors").exists()


def test_library_refuses_what_the_cli_refuses(two_loras):
    with pytest.raises(RequestError, match="unknown composition method 'average'"):
        compose(two_loras, method="average")
    with pytest.raises(RequestError, match="must be a finite number"):
        compose(two_loras, [float("nan"), 1.0])
