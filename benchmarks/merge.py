"""Benchmark: streamed ``adapterkit merge`` against PEFT's merge_and_unload and a plain copy of the checkpoint.

Builds (once, under bench-output/) a sharded float32 Llama-shaped checkpoint of about 1.35 GB (hidden 2048, 4 layers,
vocabulary 32000; random weights written tensor by tensor) and a rank-16 LoRA on every linear layer, then runs, each
in a fresh subprocess, side by side:

- adapterkit: ``merge_checkpoint(base, [adapter], out)`` (streamed, shard by shard);
- PEFT: ``from_pretrained`` the base, ``PeftModel.from_pretrained`` the same adapter (converted), ``merge_and_unload``,
  ``save_pretrained``;
- startup: importing adapterkit (and torch), the fixed cost inside the adapterkit time;
- copy: ``shutil.copytree`` of the base folder (the I/O floor; on Linux the kernel copies, ``copy_file_range``);
- copy-bytes: the same copy through the process (read, write), what any tool that computes new bytes must pay.

It prints wall time (best of --repeat rounds, run round robin: the machine is shared) and peak resident memory (the
child's own ``ru_maxrss``) for each, and the ratios, with and without the startup: a fixed cost of 1.5 to 2 s here
that weighs less as the checkpoint grows (``--layers 12`` is about 3 GB, ``--layers 24`` about 5.7 GB).
Run:  nice .venv/bin/python benchmarks/merge.py [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("bench-output/merge")
HIDDEN, INTERMEDIATE, VOCAB, RANK = 2048, 5632, 32000, 16
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARD_BYTES = 400 * 2**20


def linear_shape(name: str) -> tuple[int, int]:
    """[out, in] of a Llama linear layer."""
    return {"mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
            "mlp.down_proj": (HIDDEN, INTERMEDIATE)}.get(name, (HIDDEN, HIDDEN))


def build_base(folder: Path, layers: int) -> None:
    """A float32 Llama checkpoint in shards of about 400 MB, written one tensor at a time (little memory)."""
    import torch
    from transformers import LlamaConfig

    from adapterkit.io.safetensors import StreamedWriter

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=VOCAB, tie_word_embeddings=False)
    shapes = {"model.embed_tokens.weight": [VOCAB, HIDDEN], "model.norm.weight": [HIDDEN],
              "lm_head.weight": [VOCAB, HIDDEN]}
    for i in range(layers):
        for name in LINEAR:
            shapes[f"model.layers.{i}.{name}.weight"] = list(linear_shape(name))
        shapes[f"model.layers.{i}.input_layernorm.weight"] = [HIDDEN]
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = [HIDDEN]
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    folder.mkdir(parents=True)
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for number, names in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        entries = [(name, "F32", shapes[name]) for name in names]
        with StreamedWriter(folder / file, entries, {"format": "pt"}) as writer:
            for name in names:
                tensor = torch.empty(shapes[name]).normal_(std=0.02, generator=generator) if len(shapes[name]) > 1 \
                    else torch.ones(shapes[name])
                writer.write(name, tensor)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)


def build_adapter(base: Path, path: Path, peft_folder: Path, layers: int) -> None:
    import torch

    from adapterkit import Adapter, BaseModel, Component, Manifest, fingerprint, save
    from adapterkit.adapter import tensor_name
    from adapterkit.converters import peft

    generator = torch.Generator().manual_seed(1)
    targets, tensors = [], {}
    for i in range(layers):
        for name in LINEAR:
            target = f"model.layers.{i}.{name}"
            out_features, in_features = linear_shape(name)
            targets.append(target)
            tensors[tensor_name("lora", target, "lora_A")] = torch.randn(RANK, in_features, generator=generator) * 0.01
            tensors[tensor_name("lora", target, "lora_B")] = torch.randn(out_features, RANK, generator=generator) * 0.01
    manifest = Manifest([Component("lora", "lora", targets, {"rank": RANK, "alpha": 32, "scaling": "standard"})],
                        BaseModel("bench-llama", None, fingerprint(base)))
    adapter = Adapter(manifest, tensors)
    save(adapter, path)
    peft.write(adapter, peft_folder)


CHILD = {
    "adapterkit": """
from adapterkit.merge_checkpoint import merge_checkpoint
merge_checkpoint(BASE, [ADAPTER], OUTPUT)
""",
    "peft": """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
model = PeftModel.from_pretrained(model, PEFT).merge_and_unload()
model.save_pretrained(OUTPUT)
""",
    "startup": """
import adapterkit.merge_checkpoint
""",
    "copy": """
import shutil
shutil.copytree(BASE, OUTPUT)
""",
    "copy-bytes": """
import os, shutil
os.makedirs(OUTPUT)
for name in os.listdir(BASE):
    with open(os.path.join(BASE, name), "rb") as source, open(os.path.join(OUTPUT, name), "wb") as target:
        shutil.copyfileobj(source, target, 16 << 20)
""",
}
REPORT = """
import json, resource
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind: str, paths: dict) -> dict:
    output = OUT / f"out-{kind}"
    shutil.rmtree(output, ignore_errors=True)
    setup = "".join(f"{k} = {str(v)!r}\n" for k, v in {**paths, "OUTPUT": output}.items())
    os.sync()  # start every run with no dirty pages of earlier runs still being written back
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "import os; os.environ['TQDM_DISABLE'] = '1'\n" + setup
                             + CHILD[kind] + REPORT], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(output, ignore_errors=True)
    return {"wall_s": wall, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="Rounds; the best wall time of each is shown.")
    parser.add_argument("--build", action="store_true", help="Only build the checkpoint and adapter.")
    args = parser.parse_args()
    base, adapter, peft_folder = (OUT / f"base-{args.layers}", OUT / f"lora-{args.layers}.safetensors",
                                  OUT / f"lora-peft-{args.layers}")
    if args.build:
        if not base.exists():
            build_base(base, args.layers)
        build_adapter(base, adapter, peft_folder, args.layers)
        return
    if not adapter.exists():  # built in a child, so that this process stays small (children inherit its peak RSS)
        subprocess.run([sys.executable, __file__, "--build", "--layers", str(args.layers)], check=True)
    size = sum(f.stat().st_size for f in base.iterdir()) / 2**30
    paths = {"BASE": base, "ADAPTER": adapter, "PEFT": peft_folder}
    run("copy", paths)  # warm the page cache so every run reads the base from memory alike
    # Round robin, best of --repeat: the machine is shared, so each kind sees the same mix of loads.
    rounds = [{kind: run(kind, paths) for kind in ("startup", "copy", "copy-bytes", "adapterkit", "peft")}
              for _ in range(args.repeat)]
    results = {kind: {"wall_s": min(r[kind]["wall_s"] for r in rounds),
                      "peak_rss_mb": max(r[kind]["peak_rss_mb"] for r in rounds),
                      "all_wall_s": [round(r[kind]["wall_s"], 2) for r in rounds]} for kind in rounds[0]}
    print(f"checkpoint: {size:.2f} GiB float32, {args.layers} layers, hidden {HIDDEN}; LoRA rank {RANK} on "
          f"{args.layers * len(LINEAR)} linear layers")
    print(f"{'run':<12}{'best wall s':>12}{'peak RSS MB':>14}   all wall s")
    for kind, numbers in results.items():
        print(f"{kind:<12}{numbers['wall_s']:>12.1f}{numbers['peak_rss_mb']:>14.0f}   {numbers['all_wall_s']}")
    ours, peft, copy = results["adapterkit"], results["peft"], results["copy"]
    startup = results["startup"]["wall_s"]
    print(f"PEFT / adapterkit: time x{peft['wall_s'] / ours['wall_s']:.2f}, "
          f"memory x{peft['peak_rss_mb'] / ours['peak_rss_mb']:.2f}")
    work = ours["wall_s"] - startup  # the merge itself, without starting Python and importing torch
    print(f"adapterkit / copy: time x{ours['wall_s'] / copy['wall_s']:.2f} (copytree, kernel copy), "
          f"x{ours['wall_s'] / results['copy-bytes']['wall_s']:.2f} (bytes read and written by the process)")
    print(f"  without the {startup:.1f} s startup: x{work / copy['wall_s']:.2f} (copytree), "
          f"x{work / results['copy-bytes']['wall_s']:.2f} (bytes through the process)")
    (OUT / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
