"""Benchmark: compose 4 LoRAs of rank 16 on a Llama of 2048 hidden (TinyLlama's shapes), ours vs PEFT, side by side.

    nice python benchmarks/compose.py            # 4 layers: q,k,v,o,gate,up,down = 28 matrices
    nice python benchmarks/compose.py --layers 1 # a quick run first

Ours: ``adapterkit.compose.compose`` with ``svd`` (rank 16, from the factors alone) and ``concat`` (exact).
PEFT: ``add_weighted_adapter`` with ``svd`` (svd_rank 16: forms each d×k delta, full SVD) and ``cat``.
Prints wall times (best of --repeat, PEFT svd once), ratios, and the relative Frobenius errors of both svd results against the exact weighted sum.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapterkit import Adapter, BaseModel, Component, Manifest
from adapterkit.adapter import tensor_name
from adapterkit.compose import compose

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(layers: int) -> LlamaForCausalLM:
    """TinyLlama's shapes with a small vocabulary; memory allocated but not randomly initialised (nothing reads it)."""
    config = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to_empty(device="cpu").eval()


def random_loras(model, count: int, rank: int, alpha: float) -> list[Adapter]:
    generator = torch.Generator().manual_seed(0)
    targets = [name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]
    adapters = []
    for _ in range(count):
        tensors = {}
        for target in targets:
            out_features, in_features = model.get_submodule(target).weight.shape
            tensors[tensor_name("default", target, "lora_A")] = torch.randn(rank, in_features, generator=generator) * 0.02
            tensors[tensor_name("default", target, "lora_B")] = torch.randn(out_features, rank, generator=generator) * 0.02
        params = {"rank": rank, "alpha": alpha, "scaling": "standard", "fan_in_fan_out": False}
        adapters.append(Adapter(Manifest([Component("default", "lora", targets, params)], BaseModel()), tensors))
    return adapters


def peft_model_with(model, adapters: list[Adapter], rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    peft_model = get_peft_model(model, config, adapter_name="in0")
    for i, adapter in enumerate(adapters):
        if i:
            peft_model.add_adapter(f"in{i}", config)
        for target, roles in adapter.component_tensors("default").items():
            module = peft_model.base_model.model.get_submodule(target)
            module.lora_A[f"in{i}"].weight.data.copy_(roles["lora_A"])
            module.lora_B[f"in{i}"].weight.data.copy_(roles["lora_B"])
    return peft_model


def timed(run, repeat: int = 1):
    """The result of ``run()`` and its best wall time over ``repeat`` runs (the least disturbed by other load)."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return result, best


def relative_error(exact: dict, approximate: dict) -> float:
    error = sum(torch.linalg.matrix_norm(exact[t] - approximate[t]).item() ** 2 for t in exact)
    norm = sum(torch.linalg.matrix_norm(exact[t]).item() ** 2 for t in exact)
    return math.sqrt(error / norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="best of N for all but PEFT svd (run once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.nice(10)
    alpha = 2.0 * args.rank
    weights = [1.0, 0.5, -0.5, 0.25, 0.75, -0.25][: args.adapters] + [1.0] * max(0, args.adapters - 6)

    model = build_model(args.layers)
    adapters = random_loras(model, args.adapters, args.rank, alpha)
    matrices = len(adapters[0].components[0].targets)
    print(f"{args.adapters} LoRAs of rank {args.rank} on a {args.layers}-layer, 2048-hidden Llama: {matrices} matrices, "
          f"{torch.get_num_threads()} threads")

    ours_svd, t_ours_svd = timed(lambda: compose(adapters, weights, method="svd", rank=args.rank), args.repeat)
    _, t_ours_cat = timed(lambda: compose(adapters, weights, method="concat"), args.repeat)

    peft_model = peft_model_with(model, adapters, args.rank, alpha)
    names = [f"in{i}" for i in range(args.adapters)]
    fresh = itertools.count()  # add_weighted_adapter does nothing for a name it already holds
    _, t_peft_cat = timed(lambda: peft_model.add_weighted_adapter(
        names, weights, f"cat{next(fresh)}", combination_type="cat"), args.repeat)
    _, t_peft_svd = timed(lambda: peft_model.add_weighted_adapter(
        names, weights, "svd", combination_type="svd", svd_rank=args.rank))

    scaling = alpha / args.rank
    exact = {}
    for adapter, weight in zip(adapters, weights):
        for target, roles in adapter.component_tensors("default").items():
            exact[target] = exact.get(target, 0) + (weight * scaling) * (roles["lora_B"].double() @ roles["lora_A"].double())
    ours = {t: r["lora_B"].double() @ r["lora_A"].double() for t, r in ours_svd.component_tensors("composed").items()}
    theirs = {t: peft_model.base_model.model.get_submodule(t).get_delta_weight("svd").double() for t in exact}
    error_ours, error_peft = relative_error(exact, ours), relative_error(exact, theirs)

    print(f"{'method':<28}{'wall s':>10}{'vs ours':>10}")
    for label, seconds, ours_seconds in [
        ("ours svd (rank %d)" % args.rank, t_ours_svd, t_ours_svd),
        ("PEFT svd (svd_rank %d)" % args.rank, t_peft_svd, t_ours_svd),
        ("ours concat", t_ours_cat, t_ours_cat),
        ("PEFT cat", t_peft_cat, t_ours_cat),
    ]:
        print(f"{label:<28}{seconds:>10.3f}{seconds / ours_seconds:>9.1f}x")
    recorded = ours_svd.manifest.composition["error"]["relative"]
    print(f"relative Frobenius error vs the exact sum: ours {error_ours:.6e} (recorded {recorded:.6e}), "
          f"PEFT {error_peft:.6e}")
    print(f"PEFT svd / ours svd: {t_peft_svd / t_ours_svd:.0f}x slower; error ours/PEFT {error_ours / error_peft:.6f}")


if __name__ == "__main__":
    main()
