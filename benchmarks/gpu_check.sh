#!/usr/bin/env bash
# A few minutes on a GPU machine (torch with CUDA, no network): what adapterkit does on CUDA, compared with the CPU.
#   attach (every kind) · a few training steps (over a float32 base, and over int8 and nf4 ones) · merge
#   · mixed-batch serving (per-row adapters, the serving engine) · the ONNX runner on CUDA with IO binding (where an onnxruntime GPU build is installed), with swappable adapters
#     and with an adapter bank (a different adapter on each row of one run)
# Each check prints the largest difference from the CPU result; the script exits 1 if one is above its tolerance.
# Without CUDA (or with CUDA_VISIBLE_DEVICES=) it runs the same checks on the CPU against itself, as a dry run.
# Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec python - <<'PY'
import copy
import sys
import tempfile
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapterkit import Adapter, BaseModel, Manifest, fingerprint
from adapterkit.attach import attach
from adapterkit.kinds import get_kind
from adapterkit.merge import merge_into_model
from adapterkit.precision import hold
from adapterkit.serve.engine import Engine, Request, Sampling
from adapterkit.train.init import new_components, option_defaults

warnings.filterwarnings("ignore")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
torch.backends.cudnn.allow_tf32 = False
print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'no CUDA: a dry run on the CPU'}; "
      f"torch {torch.__version__}")
failed = []


def check(name: str, cpu: torch.Tensor, other: torch.Tensor, atol: float) -> None:
    diff = float((cpu.float() - other.float().cpu()).abs().max())
    ok = diff <= atol
    print(f"  {name:<50} max difference {diff:.2e}  {'ok' if ok else 'FAILED'} (atol {atol:g})")
    if not ok:
        failed.append(name)


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def random_adapter(kind: str, model, seed: int, **options) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    components, tensors = new_components(model, kind, options={**option_defaults(), **options}, generator=generator)
    tensors = {n: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * 0.05 for n, v in tensors.items()}
    replaced = [t for c in components for t in get_kind(c.kind).replaced_targets(c)]
    return Adapter(Manifest(components, BaseModel("check", None, fingerprint(model, exclude=replaced))), tensors)


cpu_model = base()
gpu_model = copy.deepcopy(cpu_model).to(DEVICE)
ids = torch.randint(0, 1024, (4, 48), generator=torch.Generator().manual_seed(0))
kinds = {"lora": {"rank": 8}, "dora": {"rank": 8}, "ia3": {}, "bitfit": {}, "prefix": {"prefix_length": 8},
         "adapter": {}}
adapters = {kind: random_adapter(kind, cpu_model, i, **options) for i, (kind, options) in enumerate(kinds.items())}


def logits(model, inputs, handle=None, rows=None):
    with torch.no_grad():
        if rows is None:
            return model(input_ids=inputs.to(model.device)).logits
        with handle.rows(rows):
            return model(input_ids=inputs.to(model.device)).logits


print("1. attach, every kind")
for kind, adapter in adapters.items():
    with attach(cpu_model, adapter), attach(gpu_model, adapter):
        check(f"attach {kind}", logits(cpu_model, ids), logits(gpu_model, ids), 2e-4)

def losses_of_training(model, steps: int, **attach_options) -> torch.Tensor:
    """The losses of ``steps`` AdamW steps of the LoRA adapter on ``model`` (on its device), from the same start."""
    with attach(model, adapters["lora"], trainable=True, **attach_options) as handle:
        optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
        batch = ids.to(next(model.parameters()).device)
        trace = []
        for _ in range(steps):
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.append(loss.detach().cpu())
    return torch.stack(trace)


print("2. training: 5 AdamW steps of a LoRA, the same start")
check("training losses", losses_of_training(cpu_model, 5), losses_of_training(gpu_model, 5), 1e-3)

print("2b. training over a base held in int8 and nf4 (embeddings and head in bfloat16), the same start")
for precision in ("int8", "nf4"):
    traces = []
    for device in ("cpu", DEVICE):
        held = copy.deepcopy(cpu_model).to(device).requires_grad_(False)
        hold(held, precision, device=device)
        # a held base gives no fingerprint back (no checkpoint folder here to check against): force
        traces.append(losses_of_training(held, 3, dtype=torch.float32, force=True))
    check(f"training losses over {precision}", *traces, 1e-3)

print("3. merge")
merged_cpu = merge_into_model(copy.deepcopy(cpu_model), [adapters["lora"], adapters["dora"]])
merged_gpu = merge_into_model(copy.deepcopy(cpu_model).to(DEVICE), [adapters["lora"], adapters["dora"]])
check("merge lora + dora", logits(merged_cpu, ids), logits(merged_gpu, ids), 2e-4)

print("4. mixed batches: per-row adapters, and the serving engine")
mixed = list(adapters.values())
rows = [0, 1, 2, None]
with attach(cpu_model, mixed, per_row=True) as cpu_handle, attach(gpu_model, mixed, per_row=True) as gpu_handle:
    check("per-row logits (lora, dora, ia3, base rows)", logits(cpu_model, ids, cpu_handle, rows),
          logits(gpu_model, ids, gpu_handle, rows), 2e-4)
    check("per-row logits (bitfit, prefix, bottleneck, lora)", logits(cpu_model, ids, cpu_handle, [3, 4, 5, 0]),
          logits(gpu_model, ids, gpu_handle, [3, 4, 5, 0]), 2e-4)
prompts = [torch.randint(0, 1024, (8 + i % 24,), generator=torch.Generator().manual_seed(i)).tolist()
           for i in range(48)]
names = list(adapters)


def serve(model, jobs, max_batch):
    engine = Engine(model, adapters, max_batch=max_batch, max_waiting=len(jobs))
    answers = [[] for _ in jobs]
    done = []
    engine.start()
    start = time.perf_counter()
    for i, adapter in enumerate(jobs):
        def listener(token, reason, error, i=i):
            if token is not None:
                answers[i].append(token)
            else:
                done.append(error)
        engine.submit(Request(adapter, prompts[i], Sampling(max_tokens=24, temperature=0), listener))
    while len(done) < len(jobs):
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    engine.stop()
    assert not any(done), done
    return answers, sum(map(len, answers)) / seconds


jobs = [names[i % len(names)] for i in range(len(prompts))]
cpu_answers, _ = serve(cpu_model, jobs, 48)
gpu_answers, mixed_rate = serve(gpu_model, jobs, 48)
_, one_rate = serve(gpu_model, ["lora"] * len(prompts), 48)
same = sum(a == b for a, b in zip(cpu_answers, gpu_answers))
print(f"  greedy answers equal to the CPU's: {same} of {len(prompts)}; {DEVICE} tokens/s mixed {mixed_rate:.0f}, "
      f"one adapter {one_rate:.0f} ({mixed_rate / one_rate:.2f}×)")
if same < len(prompts) - 2:  # a near-tie may flip one token between devices; more is a bug
    failed.append("serving")

print("5. ONNX Runtime")
import onnxruntime as ort

from adapterkit.onnx.export import export_onnx
from adapterkit.onnx.runner import CUDA, Runner

with tempfile.TemporaryDirectory() as folder:
    cpu_model.save_pretrained(f"{folder}/base")
    export_onnx(f"{folder}/base", [adapters["lora"], adapters["prefix"]], f"{folder}/onnx", merged=False,
                names=["lora", "prefix"])
    runner = Runner(f"{folder}/onnx")
    available = CUDA in ort.get_available_providers()
    print(f"  onnxruntime {ort.__version__}: runs on {runner.provider}"
          + ("" if available else " (no onnxruntime GPU build here: the CPU runner is checked instead)"))
    if available and DEVICE == "cuda" and runner.provider != CUDA:
        failed.append("onnxruntime CUDA provider")
    array = ids.numpy()
    for name in ("lora", "prefix"):
        out = runner.run({"input_ids": array, "attention_mask": (array * 0 + 1)}, adapter=name)["logits"]
        with attach(cpu_model, adapters[name]):
            check(f"ONNX ({runner.provider}) with {name} vs torch", logits(cpu_model, ids), torch.from_numpy(out), 1e-3)
    bank_names = ["lora", "prefix", "ia3"]
    export_onnx(f"{folder}/base", [adapters[name] for name in bank_names], f"{folder}/bank", merged=False,
                names=bank_names, bank=True)
    bank = Runner(f"{folder}/bank")
    rows = [*bank_names, None]
    out = bank.run({"input_ids": array, "attention_mask": (array * 0 + 1)}, adapter=rows)["logits"]
    alone = []
    for row, name in enumerate(rows):
        with attach(cpu_model, adapters[name]) if name else torch.no_grad():
            alone.append(logits(cpu_model, ids[row:row + 1]))
    check(f"ONNX bank ({bank.provider}), one adapter a row vs torch", torch.cat(alone), torch.from_numpy(out), 1e-3)

print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
sys.exit(1 if failed else 0)
PY
