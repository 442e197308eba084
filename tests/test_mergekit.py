"""compose (ties, dare, concat) then merge, against mergekit (Goddard et al. 2024) on the same deltas.

Two fine-tuned tiny Llamas are made by merging two LoRAs into one base; mergekit merges the checkpoints (``ties``,
``dare_ties``, ``linear``, ``task_arithmetic``), adapterkit composes the LoRAs and merges the composite into the base.
mergekit runs once, in a subprocess, through its Python API (all merges in that one run: a few seconds).

Where the definitions differ: mergekit's TIES divides each entry's agreeing sum by the sum of the agreeing inputs'
weights, the paper (Yadav et al. 2023, Algorithm 1, "disjoint merge": the mean over the agreeing models) and our
default by their count: ``ties_normalise="weights"`` is mergekit's; with every weight 1 the two agree. mergekit's
``dare_ties`` drops entries at random (compared at density 1, where nothing is dropped) and does not normalise: that
is ``ties_normalise="none"``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mergekit")

import tiny_models  # noqa: E402
from adapterkit import save  # noqa: E402
from adapterkit.compose import compose  # noqa: E402
from adapterkit.io.checkpoint import Checkpoint  # noqa: E402
from adapterkit.merge_checkpoint import merge_checkpoint  # noqa: E402
from cli_runner import call_cli  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN0 = "model.layers.0.mlp.down_proj"
UP1 = "model.layers.1.mlp.up_proj"
FULL_RANK = 64  # ≥ min(out, in) of every target: the re-factorisation of a dense result is exact
#: name -> (mergekit method, per-model parameters, weights); the fine-tuned models are "a" and "b"
MERGES = {
    "ties": ("ties", {"density": 0.5}, [0.7, 0.3]),
    "ties_equal": ("ties", {"density": 0.5}, [1.0, 1.0]),
    "dare_ties": ("dare_ties", {"density": 1.0}, [0.7, 0.3]),
    "linear": ("linear", {}, [2.0, 1.0]),
    "task_arithmetic": ("task_arithmetic", {}, [0.7, -0.3]),
}
RUNNER = """
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

jobs = json.loads(sys.argv[1])
for out, config in jobs.items():
    run_merge(MergeConfiguration.model_validate(config), out,
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False, quiet=True))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The base, two LoRAs (different ranks, α and overlapping targets), the two fine-tuned models, and mergekit's
    merges of them."""
    root = tmp_path_factory.mktemp("mergekit")
    llama = tiny_models.llama()
    llama.save_pretrained(root / "base")
    loras = {"a": tiny_models.random_lora(llama, [Q0, V1, UP1], rank=4, alpha=8.0, seed=1),
             "b": tiny_models.random_lora(llama, [Q0, DOWN0, UP1], rank=6, alpha=3.0, seed=2)}
    for name, lora in loras.items():
        save(lora, root / f"{name}.safetensors")
        merge_checkpoint(root / "base", [lora], root / f"ft_{name}")
    jobs = {}
    for out, (method, parameters, weights) in MERGES.items():
        config = {"merge_method": method, "dtype": "float32",
                  "models": [{"model": str(root / f"ft_{name}"), "parameters": {"weight": weight, **parameters}}
                             for name, weight in zip("ab", weights)]}
        if method != "linear":
            config["base_model"] = str(root / "base")
        jobs[str(root / f"mergekit_{out}")] = config
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return root, loras


def tensors(folder) -> dict[str, np.ndarray]:
    with Checkpoint(folder) as checkpoint:
        return {name: np.array(checkpoint.get(name), dtype=np.float64) for name in checkpoint.names()}


def ours(root, loras, name, weights, **options):
    composite = compose([loras["a"], loras["b"]], weights, **options)
    merge_checkpoint(root / "base", [composite], root / f"ours_{name}", overwrite=True)
    return tensors(root / f"ours_{name}")


def assert_same_weights(got, expected, atol=2e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=atol, rtol=0, err_msg=name)


def test_ties_with_weights_normalisation_equals_mergekit_ties(folders):
    root, loras = folders
    got = ours(root, loras, "ties_weights", MERGES["ties"][2], method="ties", density=0.5, rank=FULL_RANK,
               normalise="weights")
    expected = tensors(root / "mergekit_ties")
    assert_same_weights(got, expected)
    default = ours(root, loras, "ties_count", MERGES["ties"][2], method="ties", density=0.5, rank=FULL_RANK)
    assert not np.allclose(default[f"{Q0}.weight"], expected[f"{Q0}.weight"], atol=1e-4)  # unequal weights differ


def test_ties_count_normalisation_is_the_papers_disjoint_mean_by_hand(folders):
    """Yadav et al. 2023, Algorithm 1: trim each task vector to its top-k magnitudes, elect the sign of the summed
    trimmed vectors, average the agreeing entries over the number of agreeing models."""
    root, loras = folders
    weights = MERGES["ties"][2]
    got = ours(root, loras, "ties_count", weights, method="ties", density=0.5, rank=FULL_RANK)
    base, fine = tensors(root / "base"), {n: tensors(root / f"ft_{n}") for n in "ab"}
    for name in (f"{t}.weight" for t in (Q0, V1, DOWN0, UP1)):
        trimmed = []
        for model, weight in zip("ab", weights):
            delta = (fine[model][name] - base[name]) * weight
            kept = np.zeros(delta.size, bool)
            kept[np.argsort(-np.abs(delta), axis=None)[: int(0.5 * delta.size)]] = True
            trimmed.append(np.where(kept.reshape(delta.shape), delta, 0.0))
        trimmed = np.stack(trimmed)
        sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        expected = base[name] + (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
        np.testing.assert_allclose(got[name], expected, atol=2e-6, rtol=0, err_msg=name)


def test_ties_with_equal_weights_agrees_with_mergekit_either_way(folders):
    root, loras = folders
    expected = tensors(root / "mergekit_ties_equal")
    for normalise in ("count", "weights"):
        got = ours(root, loras, f"ties_equal_{normalise}", [1.0, 1.0], method="ties", density=0.5, rank=FULL_RANK,
                   normalise=normalise)
        assert_same_weights(got, expected)


def test_dare_ties_at_density_one_is_ties_without_normalisation(folders):
    root, loras = folders
    got = ours(root, loras, "ties_none", MERGES["dare_ties"][2], method="ties", density=1.0, rank=FULL_RANK,
               normalise="none")
    assert_same_weights(got, tensors(root / "mergekit_dare_ties"))


def test_concat_and_dare_at_density_one_equal_task_arithmetic(folders):
    root, loras = folders
    weights = MERGES["task_arithmetic"][2]
    expected = tensors(root / "mergekit_task_arithmetic")
    assert_same_weights(ours(root, loras, "concat", weights), expected)
    assert_same_weights(ours(root, loras, "dare", weights, method="dare", density=1.0, rank=FULL_RANK), expected)


def test_concat_with_weights_over_their_sum_equals_linear(folders):
    root, loras = folders
    weights = MERGES["linear"][2]
    got = ours(root, loras, "linear", [w / sum(weights) for w in weights])
    assert_same_weights(got, tensors(root / "mergekit_linear"))


def test_cli_compose_ties_normalise_weights_then_merge_equals_mergekit(folders):
    root, _ = folders
    composed = root / "cli_ties.safetensors"
    done = call_cli("compose", root / "a.safetensors", root / "b.safetensors", "--weights", "0.7,0.3",
                    "--method", "ties", "--density", "0.5", "--ties-normalise", "weights", "--rank", FULL_RANK,
                    "-o", composed)
    assert done.returncode == 0, done.stderr
    done = call_cli("merge", root / "base", composed, "-o", root / "cli_merged")
    assert done.returncode == 0, done.stderr
    assert_same_weights(tensors(root / "cli_merged"), tensors(root / "mergekit_ties"))
    done = call_cli("compose", root / "a.safetensors", "--method", "concat", "--ties-normalise", "weights",
                    "-o", root / "refused.safetensors")
    assert done.returncode == 1 and "--ties-normalise does not apply to concat" in done.stderr
