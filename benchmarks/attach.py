"""Benchmark: forward time of a Llama with adapters attached (unmerged), ours vs PEFT, side by side.

    nice python benchmarks/attach.py               # 2 layers of 1024 hidden, batch 4 × 128 tokens
    nice python benchmarks/attach.py --layers 1    # a quick run first

Rows: the base model alone; LoRA rank 16 on q,k,v,o,gate,up,down (ours: ``adapterkit.attach``; PEFT: ``PeftModel``);
the same LoRA merged into the weights (the floor); prefix tuning with 16 virtual tokens (ours: a registered attention
function; PEFT: the prefix fed as past key/values). Each time is the median of several runs; ratios are against the
base model and, per method, ours against PEFT. Also prints the largest logit difference between ours and PEFT.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapterkit import Adapter
from adapterkit.attach import attach
from adapterkit.converters import peft as peft_format
from adapterkit.merge import merge_into_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def timed(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run; the runs take turns, so a change of load on a shared machine hits all alike."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for name, run in runs.items():
            run()  # warm up
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def from_peft(peft_model, model, folder: Path) -> Adapter:
    """Our adapter for a PEFT model, made as a user makes it: PEFT saves its folder, our converter reads it (with the
    base saved beside it, which a prefix needs to find the modules that read it)."""
    model.save_pretrained(folder / "base")
    peft_model.save_pretrained(folder / "peft")
    return peft_format.read(folder / "peft", base=folder / "base")


def lora_pair(model, rank: int, folder: Path):
    """Our LoRA adapter and a PeftModel holding the same A and B."""
    targets = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                                 init_lora_weights=False))
    return from_peft(peft_model, model, folder / "lora"), peft_model


def prefix_pair(model, length: int, folder: Path):
    """Our prefix adapter and a PEFT prefix-tuning model holding the same keys and values."""
    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                         num_virtual_tokens=length)).eval()
    return from_peft(peft_model, model, folder / "prefix"), peft_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model = build_model(args.layers)
    ids = torch.randint(0, 1024, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))

    def forward(m):
        return lambda: m(input_ids=ids, use_cache=False).logits

    with tempfile.TemporaryDirectory() as folder:
        lora, peft_lora = lora_pair(model, 16, Path(folder))
        prefix, peft_prefix = prefix_pair(model, 16, Path(folder))
    with_lora, with_prefix = copy.deepcopy(model), copy.deepcopy(model)
    attach(with_lora, lora)
    attach(with_prefix, prefix)
    runs = {"base": forward(model), "lora PEFT": forward(peft_lora), "lora ours": forward(with_lora),
            "lora merged": forward(merge_into_model(copy.deepcopy(model), [lora])),
            "prefix PEFT": lambda: peft_prefix(input_ids=ids).logits, "prefix ours": forward(with_prefix)}
    with torch.no_grad():
        lora_diff = (runs["lora ours"]() - runs["lora PEFT"]()).abs().max().item()
        prefix_diff = (runs["prefix ours"]() - runs["prefix PEFT"]()).abs().max().item()
    rows = timed(runs, args.repeats)

    print(f"Llama {args.layers} layers × 1024 hidden, batch {args.batch} × {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, seconds in rows.items():
        print(f"  {name:<12} {seconds * 1000:8.1f} ms   {seconds / rows['base']:5.2f}× base")
    print(f"  ours / PEFT: lora {rows['lora ours'] / rows['lora PEFT']:.2f}×, "
          f"prefix {rows['prefix ours'] / rows['prefix PEFT']:.2f}×")
    print(f"  max |logits ours - PEFT|: lora {lora_diff:.2e}, prefix {prefix_diff:.2e}")


if __name__ == "__main__":
    main()
