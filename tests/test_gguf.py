"""GGUF LoRA (llama.cpp) both ways, checked with llama.cpp itself.

- llama-cpp-python (``Llama(base.gguf, lora_path=a.gguf, logits_all=True, type_k=0, type_v=0)``: float32 KV cache)
  against our merged torch model, within 1e-4: tiny Llama LoRAs of ranks 4, 8 and 12 on every linear layer, the
  embedding and the output head; rsLoRA with per-target alpha and rank and a component weight; a composed adapter;
  and one LoRA on each other architecture the converter knows (Mistral, Qwen2, Qwen3, Gemma, Phi-3);
- llama.cpp's own ``convert_lora_to_gguf.py`` on our portable PEFT output gives the same ΔW as our GGUF;
- GGUF -> adapterkit gives back the original ΔW (ours, and llama.cpp's converter's files);
- what llama.cpp cannot hold is refused in one line, before anything is written.

The llama.cpp checks skip, saying why, when llama-cpp-python is not installed (``make setup`` installs the prebuilt
wheel from ``../shared/wheels/`` when it is there) or llama.cpp's conversion scripts are not fetched
(``make llama-cpp-source``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'adapterkit[gguf]')")

import llama_cpp_tools
import tiny_models
from adapterkit import Adapter, BaseModel, Manifest, fingerprint, load, save
from adapterkit.adapter import tensor_name
from adapterkit.compose import compose
from adapterkit.converters import gguf as gguf_format
from adapterkit.converters import peft as peft_format
from adapterkit.converters.registry import detect_format
from adapterkit.merge import merge_into_model
from adapterkit.train.init import new_components, option_defaults
from cli_runner import call_cli

IDS = [1, 5, 9, 33, 2, 77, 100, 3, 64, 127]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
needs_llama_cpp = pytest.mark.skipif(llama_cpp_tools.llama_cpp_missing() is not None,
                                     reason=llama_cpp_tools.llama_cpp_missing() or "")
needs_converter = pytest.mark.skipif(llama_cpp_tools.converter_missing() is not None,
                                     reason=llama_cpp_tools.converter_missing() or "")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Per family: (HF folder, base GGUF)."""
    folder = tmp_path_factory.mktemp("gguf_bases")
    out = {}
    for family in FAMILIES:
        model = tiny_models.causal_lm(family)
        model.save_pretrained(folder / family)
        llama_cpp_tools.write_base_gguf(model, folder / f"{family}.gguf")
        out[family] = (folder / family, folder / f"{family}.gguf")
    return out


def with_targets(adapter: Adapter, model, extra: dict[str, dict], seed: int = 5) -> Adapter:
    """``adapter`` (one LoRA component) with more targets, each with its own params (rank, alpha, fan_in_fan_out:
    an embedding's A is [r, vocab], B [dim, r])."""
    [component] = adapter.components
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors = dict(adapter.tensors)
    for target, override in extra.items():
        module = modules[target]
        rank = override.get("rank", component.params["rank"])
        if isinstance(module, torch.nn.Embedding):
            fan_in, fan_out = module.num_embeddings, module.embedding_dim
        else:
            fan_in, fan_out = module.in_features, module.out_features
        tensors[tensor_name(component.name, target, "lora_A")] = (torch.randn(rank, fan_in, generator=generator) * 0.1
                                                                  ).numpy()
        tensors[tensor_name(component.name, target, "lora_B")] = (torch.randn(fan_out, rank, generator=generator) * 0.1
                                                                  ).numpy()
        component.targets.append(target)
        if override:
            component.target_params[target] = dict(override)
    return Adapter(adapter.manifest, tensors)


def full_lora(model, rank: int, seed: int = 1, **options) -> Adapter:
    """A LoRA on every linear layer, the output head and the embedding of a tiny causal LM."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and not (n == "lm_head" and model.config.tie_word_embeddings)]
    adapter = tiny_models.random_lora(model, linear, rank=rank, seed=seed, **options)
    if model.config.tie_word_embeddings or type(model.get_input_embeddings()) is not torch.nn.Embedding:
        return adapter
    return with_targets(adapter, model, {"model.embed_tokens": {"fan_in_fan_out": True}}, seed=seed + 100)


def rslora_with_patterns(model) -> Adapter:
    """rsLoRA rank 8, alpha 6, weight 0.7; per-target alpha (q_proj of layer 0: 3), per-target rank and alpha
    (v_proj of layer 1: rank 2, alpha 5; the embedding: rank 3)."""
    adapter = tiny_models.random_lora(model, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                              "model.layers.1.mlp.down_proj", "lm_head"],
                                      rank=8, alpha=6.0, scaling="rslora", seed=3)
    adapter = with_targets(adapter, model, {"model.layers.1.self_attn.v_proj": {"rank": 2, "alpha": 5.0},
                                            "model.embed_tokens": {"rank": 3, "fan_in_fan_out": True}})
    [component] = adapter.components
    component.target_params["model.layers.0.self_attn.q_proj"] = {"alpha": 3.0}
    component.weight = 0.7
    adapter.validate()
    return adapter


def composed(model) -> Adapter:
    a = full_lora(model, rank=4, seed=11, alpha=8.0)
    b = tiny_models.random_lora(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"], rank=6,
                                alpha=4.0, seed=12, scaling="rslora")
    return compose([a, b], weights=[0.6, -1.3])


def merged_logits(family: str, adapter: Adapter) -> np.ndarray:
    with torch.no_grad():
        model = merge_into_model(tiny_models.causal_lm(family), [adapter])
        return model(torch.tensor([IDS])).logits[0].numpy()


def deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """What merge adds to each target's base weight (stored layout)."""
    [component] = adapter.components
    return {target: tiny_models.merged_delta(component, target, roles)
            for target, roles in adapter.component_tensors(component.name).items()}


def assert_same_deltas(actual: Adapter, expected: Adapter, atol: float = 1e-6) -> None:
    ours, theirs = deltas(actual), deltas(expected)
    assert sorted(ours) == sorted(theirs)
    for target in theirs:
        torch.testing.assert_close(ours[target], theirs[target], atol=atol, rtol=0, msg=lambda m: f"{target}: {m}")


LLAMA_CASES = {
    "rank-4": lambda model: full_lora(model, rank=4, alpha=8.0),
    "rank-8": lambda model: full_lora(model, rank=8, alpha=16.0, seed=2),
    "rank-12": lambda model: full_lora(model, rank=12, alpha=6.0, seed=4),
    "rslora-patterns-weight": rslora_with_patterns,
    "composed": composed,
}


@needs_llama_cpp
def test_llama_cpp_logits_equal_our_merged_model_on_llama(bases, tmp_path):
    folder, base_gguf = bases["llama"]
    model = tiny_models.causal_lm("llama")
    jobs, expected = [(base_gguf, None, IDS)], [merged_logits("llama", Adapter(Manifest([], BaseModel()), {}))]
    for name, build in LLAMA_CASES.items():
        adapter = build(model)
        gguf_format.write(adapter, tmp_path / f"{name}.gguf", base=folder)
        jobs.append((base_gguf, tmp_path / f"{name}.gguf", IDS))
        expected.append(merged_logits("llama", adapter))
    actual = llama_cpp_tools.llama_cpp_logits(jobs, tmp_path)
    for name, ours, theirs in zip(["base", *LLAMA_CASES], expected, actual):
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0, err_msg=name)
        if name != "base":  # the adapter does change the output
            assert np.abs(theirs - expected[0]).max() > 0.05, name


@needs_llama_cpp
def test_llama_cpp_logits_equal_our_merged_model_on_each_architecture(bases, tmp_path):
    jobs, expected = [], []
    for family in FAMILIES[1:]:
        folder, base_gguf = bases[family]
        adapter = full_lora(tiny_models.causal_lm(family), rank=4, alpha=8.0, seed=7)
        gguf_format.write(adapter, tmp_path / f"{family}.gguf", base=folder)
        jobs += [(base_gguf, None, IDS), (base_gguf, tmp_path / f"{family}.gguf", IDS)]
        expected += [merged_logits(family, Adapter(Manifest([], BaseModel()), {})), merged_logits(family, adapter)]
    actual = llama_cpp_tools.llama_cpp_logits(jobs, tmp_path)
    for i, family in enumerate(FAMILIES[1:]):
        for what, ours, theirs in (("base", expected[2 * i], actual[2 * i]),
                                   ("lora", expected[2 * i + 1], actual[2 * i + 1])):
            np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0, err_msg=f"{family} {what}")


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_round_trip_gives_back_the_same_delta(case, bases, tmp_path):
    folder, _ = bases["llama"]
    adapter = LLAMA_CASES[case](tiny_models.causal_lm("llama"))
    gguf_format.write(adapter, tmp_path / "a.gguf", base=folder)
    back = gguf_format.read(tmp_path / "a.gguf", base=folder)
    assert_same_deltas(back, adapter)
    assert back.manifest.base_model.fingerprints["fp2"] == fingerprint(folder)
    # one uniform alpha in the file: the other targets' scales were folded into B
    [component] = back.components
    assert all("alpha" not in override for override in component.target_params.values())


def test_q_and_k_rows_are_permuted_for_rope_and_back(bases, tmp_path):
    import gguf

    folder, _ = bases["llama"]
    adapter = tiny_models.random_lora(tiny_models.causal_lm("llama"), ["model.layers.0.self_attn.q_proj",
                                                                       "model.layers.0.self_attn.k_proj",
                                                                       "model.layers.0.self_attn.v_proj"], alpha=4.0)
    gguf_format.write(adapter, tmp_path / "a.gguf", base=folder)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    held = adapter.component_tensors("default")
    q_b = held["model.layers.0.self_attn.q_proj"]["lora_B"]  # 4 heads of 8 rows: 0 4 1 5 2 6 3 7 in each head
    np.testing.assert_array_equal(stored["blk.0.attn_q.weight.lora_b"][:8], q_b[[0, 4, 1, 5, 2, 6, 3, 7]])
    k_b = held["model.layers.0.self_attn.k_proj"]["lora_B"]  # 2 key/value heads
    np.testing.assert_array_equal(stored["blk.0.attn_k.weight.lora_b"], gguf_format.permute(k_b, 2))
    v_b = held["model.layers.0.self_attn.v_proj"]["lora_B"]  # not permuted
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight.lora_b"], v_b)
    assert reader.get_field("adapter.lora.alpha").contents() == 4.0
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("general.architecture").contents() == "llama"


@needs_converter
def test_llama_cpp_converter_on_our_portable_peft_output_gives_our_gguf_delta(bases, tmp_path):
    """Our PEFT output (one alpha, scales folded) through llama.cpp's convert_lora_to_gguf.py, which reads only
    lora_alpha, gives the ΔW of our own GGUF, and reads back as the original adapter's ΔW."""
    import gguf

    folder, _ = bases["llama"]
    model = tiny_models.causal_lm("llama")
    for name in ("rslora-patterns-weight", "composed"):
        adapter = LLAMA_CASES[name](model)
        peft_format.write(adapter, tmp_path / f"{name}_peft", base=folder)
        result = llama_cpp_tools.convert_lora_to_gguf(tmp_path / f"{name}_peft", folder, tmp_path / f"{name}_lc.gguf")
        assert result.returncode == 0, result.stderr[-3000:]
        gguf_format.write(adapter, tmp_path / f"{name}_ours.gguf", base=folder)
        theirs, ours = (gguf.GGUFReader(tmp_path / f"{name}_{who}.gguf") for who in ("lc", "ours"))
        alphas = [float(r.get_field("adapter.lora.alpha").contents()) for r in (theirs, ours)]
        pairs = [{t.name: np.array(t.data, dtype=np.float64) for t in r.tensors} for r in (theirs, ours)]
        assert sorted(pairs[0]) == sorted(pairs[1])
        for key in (k.removesuffix(".lora_a") for k in pairs[0] if k.endswith(".lora_a")):
            a_delta = [alpha / p[key + ".lora_b"].shape[1] * p[key + ".lora_b"] @ (
                p[key + ".lora_a"].T if key.startswith("token_embd") else p[key + ".lora_a"])
                for alpha, p in zip(alphas, pairs)]
            np.testing.assert_allclose(a_delta[0], a_delta[1], atol=1e-6, rtol=0, err_msg=f"{name} {key}")
        assert_same_deltas(gguf_format.read(tmp_path / f"{name}_lc.gguf", base=folder), adapter)


def test_cli_converts_both_ways_and_detects_gguf(bases, tmp_path):
    folder, _ = bases["llama"]
    adapter = rslora_with_patterns(tiny_models.causal_lm("llama"))
    save(adapter, tmp_path / "a.safetensors")
    result = call_cli("convert", tmp_path / "a.safetensors", "--to", "gguf", "--base", folder, "-o",
                      tmp_path / "a.gguf")
    assert result.returncode == 0, result.stderr
    assert detect_format(tmp_path / "a.gguf") == "gguf"
    result = call_cli("convert", tmp_path / "a.gguf", "--base", folder, "-o", tmp_path / "back.safetensors")
    assert result.returncode == 0, result.stderr
    assert_same_deltas(load(tmp_path / "back.safetensors"), adapter)


def one_line_refusal(*args, match: str, output=None) -> None:
    result = call_cli(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert match in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    if output is not None:
        assert not output.exists()


@pytest.mark.parametrize("kind", ["prefix", "bitfit", "adapter", "ia3", "dora", "full"])
def test_kinds_llama_cpp_cannot_hold_are_refused_in_one_line(kind, bases, tmp_path):
    folder, _ = bases["llama"]
    model = tiny_models.causal_lm("llama")
    components, tensors = new_components(model, kind, options=option_defaults(),
                                         generator=torch.Generator().manual_seed(0))
    save(Adapter(Manifest(components, BaseModel()), tensors), tmp_path / "a.safetensors")
    one_line_refusal("convert", tmp_path / "a.safetensors", "--to", "gguf", "--base", folder, "-o",
                     tmp_path / "a.gguf", match="llama.cpp's GGUF LoRA cannot represent", output=tmp_path / "a.gguf")


def test_other_refusals_are_one_line(bases, tmp_path):
    folder, base_gguf = bases["llama"]
    adapter = full_lora(tiny_models.causal_lm("llama"), rank=2, alpha=2.0)
    save(adapter, tmp_path / "a.safetensors")
    out = tmp_path / "a.gguf"
    one_line_refusal("convert", tmp_path / "a.safetensors", "--to", "gguf", "-o", out, match="--base is needed",
                     output=out)
    # a tied head: llama.cpp has no separate output tensor (Gemma ties it)
    gemma = tiny_models.causal_lm("gemma")
    save(tiny_models.random_lora(gemma, ["lm_head"]), tmp_path / "head.safetensors")
    one_line_refusal("convert", tmp_path / "head.safetensors", "--to", "gguf", "--base", bases["gemma"][0], "-o", out,
                     match="ties its output head", output=out)
    # an architecture llama.cpp conversion does not know here
    gpt2 = tiny_models.gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")
    save(tiny_models.random_lora(gpt2, ["transformer.h.0.attn.c_attn"], fan_in_fan_out=True),
         tmp_path / "gpt2.safetensors")
    one_line_refusal("convert", tmp_path / "gpt2.safetensors", "--to", "gguf", "--base", tmp_path / "gpt2", "-o", out,
                     match="this base is GPT2LMHeadModel", output=out)
    # a base model GGUF is not a LoRA
    one_line_refusal("convert", base_gguf, "--base", folder, "-o", tmp_path / "x.safetensors",
                     match="not 'adapter'", output=tmp_path / "x.safetensors")
    # never over an input
    one_line_refusal("convert", tmp_path / "a.safetensors", "--to", "gguf", "--base", folder, "-o",
                     tmp_path / "a.safetensors", match="refusing to write over an input")
    # two LoRA components: compose them first
    second = tiny_models.random_lora(tiny_models.causal_lm("llama"), ["model.layers.0.mlp.up_proj"], name="second")
    save(Adapter(Manifest(adapter.components + second.components, BaseModel()), {**adapter.tensors, **second.tensors}),
         tmp_path / "two.safetensors")
    one_line_refusal("convert", tmp_path / "two.safetensors", "--to", "gguf", "--base", folder, "-o", out,
                     match="compose the adapter's components into one first", output=out)


def test_reading_takes_alpha_zero_as_scale_one(bases, tmp_path):
    """llama.cpp reads a missing or zero adapter.lora.alpha as ΔW = B·A."""
    import gguf

    folder, _ = bases["llama"]
    adapter = tiny_models.random_lora(tiny_models.causal_lm("llama"), ["model.layers.1.mlp.up_proj"], rank=4)
    b = adapter.component_tensors("default")["model.layers.1.mlp.up_proj"]["lora_B"]
    a = adapter.component_tensors("default")["model.layers.1.mlp.up_proj"]["lora_A"]
    writer = gguf.GGUFWriter(tmp_path / "raw.gguf", "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.1.ffn_up.weight.lora_a", np.ascontiguousarray(a, dtype=np.float32))
    writer.add_tensor("blk.1.ffn_up.weight.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.add_tensor("blk.1.ffn_norm.weight", np.ones(32, dtype=np.float32))  # skipped, as llama.cpp skips it
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = gguf_format.read(tmp_path / "raw.gguf", base=folder)
    [delta] = deltas(back).values()
    torch.testing.assert_close(delta, torch.from_numpy(b @ a), atol=1e-6, rtol=0)
    assert back.components[0].params == {"rank": 4, "alpha": 4, "scaling": "standard", "fan_in_fan_out": False}
