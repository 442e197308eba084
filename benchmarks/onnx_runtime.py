"""ONNX Runtime (CPU) latency: unmerged graph with an adapter active vs merged graph vs torch eager, and the cost of
switching adapters vs creating a new session.

    nice .venv/bin/python benchmarks/onnx_runtime.py [--layers 4 --hidden 512 --sequence 128 --rank 16]

A random Llama (no download) with LoRA on every linear layer of every block. Timings are the best of repeated runs,
printed side by side with their ratios (targets: unmerged ≤ 1.15x merged; a switch ≥ 50x faster than a new session).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapterkit import Adapter, BaseModel, Component, Manifest, fingerprint
from adapterkit.adapter import tensor_name
from adapterkit.attach import attach
from adapterkit.onnx.export import export_onnx
from adapterkit.onnx.runner import Runner

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def lora(model, rank: int, seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    targets = [f"model.layers.{i}.{m}" for i in range(model.config.num_hidden_layers) for m in LINEAR]
    tensors = {}
    for target in targets:
        out_features, in_features = modules[target].weight.shape
        tensors[tensor_name("lora", target, "lora_A")] = torch.randn(rank, in_features, generator=generator) * 0.02
        tensors[tensor_name("lora", target, "lora_B")] = torch.randn(out_features, rank, generator=generator) * 0.02
    manifest = Manifest([Component("lora", "lora", targets, {"rank": rank, "alpha": 2.0 * rank})],
                        BaseModel("bench", None, fingerprint(model)))
    return Adapter(manifest, tensors)


def best_seconds(function, repeats: int, warmup: int = 2) -> float:
    """Best wall time of ``function`` over ``repeats`` runs: the run least disturbed by other processes on a shared
    machine, as ``timeit`` advises."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    adapters = [lora(model, args.rank, seed) for seed in (1, 2)]
    ids = torch.randint(0, args.vocab, (1, args.sequence))
    inputs = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, args.sequence), dtype=np.int64)}
    print(f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; LoRA rank {args.rank} on "
          f"{len(adapters[0].components[0].targets)} linears; batch 1, sequence {args.sequence}; "
          f"{args.threads} threads")

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model.save_pretrained(work / "base")
        start = time.perf_counter()
        export_onnx(work / "base", adapters, work / "unmerged", merged=False, names=["a", "b"])
        export_unmerged = time.perf_counter() - start
        export_onnx(work / "base", adapters[:1], work / "merged", merged=True, names=["a"])
        print(f"export (unmerged): {export_unmerged:.1f} s")

        def session(folder: str) -> Runner:
            return Runner(work / folder, providers=["CPUExecutionProvider"])

        def switch() -> None:  # a cold switch: load the adapter file and activate it for the next call
            adapter = ort.LoraAdapter()
            adapter.Load(str(work / "unmerged" / "adapters" / "b.onnx_adapter"))
            ort.RunOptions().add_active_adapter(adapter)

        # torch first and alone: its idle OpenMP threads and ORT's spinning ones would slow each other down
        with attach(model, adapters[:1]), torch.no_grad():
            eager = best_seconds(lambda: model(input_ids=ids, use_cache=False), args.repeats)
        # ORT: one session alive at a time (two sessions' thread pools compete), blocks alternated over rounds so
        # that changing load affects merged and unmerged alike; the best of all rounds counts
        best: dict[str, float] = {}
        rounds = 3
        for _ in range(rounds):
            merged = session("merged")
            timings = {"merged": best_seconds(lambda: merged.run(inputs), args.repeats // rounds)}
            del merged
            unmerged = session("unmerged")
            switches = iter(["b", "a"] * args.repeats)
            timings.update(
                unmerged=best_seconds(lambda: unmerged.run(inputs, "a"), args.repeats // rounds),
                unmerged_base=best_seconds(lambda: unmerged.run(inputs), args.repeats // rounds),
                alternating=best_seconds(lambda: unmerged.run(inputs, next(switches)), args.repeats // rounds),
            )
            del unmerged
            best = {name: min(t, best.get(name, t)) for name, t in timings.items()}
        switch_cost = best_seconds(switch, args.repeats)
        new_session = best_seconds(lambda: session("merged"), max(3, args.repeats // 4), 1)

    merged_run, unmerged_run = best["merged"], best["unmerged"]
    unmerged_base, switch_and_run = best["unmerged_base"], best["alternating"]
    print(f"{'torch eager (LoRA attached)':<38}{eager * 1e3:9.2f} ms")
    print(f"{'ORT merged':<38}{merged_run * 1e3:9.2f} ms")
    print(f"{'ORT unmerged, adapter a active':<38}{unmerged_run * 1e3:9.2f} ms   "
          f"{unmerged_run / merged_run:.3f}x merged (target <= 1.15x)")
    print(f"{'ORT unmerged, no adapter':<38}{unmerged_base * 1e3:9.2f} ms   {unmerged_base / merged_run:.3f}x merged")
    print(f"{'ORT unmerged, alternating a/b':<38}{switch_and_run * 1e3:9.2f} ms   "
          f"{switch_and_run / unmerged_run:.3f}x same adapter")
    print(f"{'ORT merged vs torch eager':<38}{merged_run / eager:9.3f}x")
    print(f"{'switch (load .onnx_adapter + activate)':<38}{switch_cost * 1e3:9.3f} ms")
    print(f"{'new session (merged graph)':<38}{new_session * 1e3:9.1f} ms   "
          f"switch is {new_session / switch_cost:.0f}x faster (target >= 50x)")


if __name__ == "__main__":
    main()
