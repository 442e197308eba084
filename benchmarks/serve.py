"""Benchmark: serving 8 LoRA adapters to concurrent clients, side by side, in one run.

    nice python benchmarks/serve.py                  # 4 layers of 512 hidden, 8 adapters, 32 clients, 64 requests
                                                     # of 16 new tokens; each row the best of 3 rounds
    nice python benchmarks/serve.py --requests 16    # a quick run first

Rows (the same requests, prompts and greedy decoding in each):

- ``mixed``: adapterkit's engine (``adapterkit serve`` without HTTP): each client's request on its own adapter, all
  in one continuously batched run (a request joins at the next token step);
- ``one at a time``: the same engine with a batch of one (each request waits for the one before);
- ``one adapter``: every request on the same adapter, batched (the ceiling mixed batching aims at);
- ``PEFT adapter_names``: PEFT's mixed-adapter batch ``generate(adapter_names=...)``, static batches of one request per
  client (a batch starts when the previous one is done);
- ``ONNX mixed`` / ``ONNX one adapter``: the same engine over the model exported with an adapter bank and a key/value
  cache (``export --onnx --unmerged --bank --cache``), run in ONNX Runtime on the CPU (``adapterkit serve`` on an ONNX
  folder); ``--no-onnx`` leaves them out.

Prints generated tokens/s and p50/p99 request latency (submission to last token) for each, and the ratios the serving
targets are about: mixed / one adapter (≥ 0.8) and mixed / one at a time (≥ 3). Clients are threads in this process
(no HTTP: the HTTP layer is the same for every row). Also checks that each mixed answer equals PEFT's for its adapter.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapterkit.converters import peft as peft_format
from adapterkit.onnx.export import export_onnx
from adapterkit.serve.engine import Engine, Request, Sampling
from adapterkit.serve.models import OnnxModel


def build_model(layers: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def peft_adapters(model, count: int, rank: int, folder: Path) -> list[Path]:
    """``count`` random LoRAs (q, k, v, o) saved by PEFT, so both sides serve the very same weights."""
    model.save_pretrained(folder / "base")
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        peft_model = get_peft_model(copy.deepcopy(model), config)
        paths.append(folder / f"a{i}")
        peft_model.save_pretrained(paths[-1])
    return paths


def run_engine(engine: Engine, jobs: list[tuple[str, list[int]]], clients: int, max_tokens: int):
    """Closed loop: ``clients`` threads, each sending its next request when its last one is answered. Returns
    (seconds, tokens, latencies, {job index: tokens})."""
    latencies, answers, lock = [], {}, threading.Lock()
    pending = list(enumerate(jobs))

    def client():
        while True:
            with lock:
                if not pending:
                    return
                index, (adapter, prompt) = pending.pop(0)
            done, tokens = threading.Event(), []

            def listener(token, reason, error):
                if token is not None:
                    tokens.append(token)
                else:
                    assert error is None, error
                    done.set()

            start = time.perf_counter()
            engine.submit(Request(adapter, prompt, Sampling(max_tokens=max_tokens, temperature=0), listener))
            done.wait()
            with lock:
                latencies.append(time.perf_counter() - start)
                answers[index] = tokens

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return seconds, sum(len(t) for t in answers.values()), latencies, answers


def run_peft(peft_model, jobs, clients: int, max_tokens: int):
    """Static batches of ``clients`` requests, left-padded, one ``generate(adapter_names=...)`` each."""
    latencies, answers = [], {}
    start = time.perf_counter()
    for first in range(0, len(jobs), clients):
        batch = jobs[first:first + clients]
        longest = max(len(p) for _, p in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, prompt) in enumerate(batch):
            ids[i, longest - len(prompt):] = torch.tensor(prompt)
            mask[i, longest - len(prompt):] = 1
        began = time.perf_counter()
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=[a for a, _ in batch],
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=0)
        latencies += [time.perf_counter() - began] * len(batch)
        for i in range(len(batch)):
            answers[first + i] = out[i, longest:].tolist()
    seconds = time.perf_counter() - start
    return seconds, sum(len(t) for t in answers.values()), latencies, answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="leave out the ONNX Runtime rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:  # the ONNX rows read the base's config from it while serving
        run(args, Path(folder))


def run(args, folder: Path) -> None:

    model = build_model(args.layers, args.hidden)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 4096, (int(torch.randint(8, 33, (1,), generator=generator)),),
                             generator=generator).tolist() for _ in range(args.requests)]
    names = [f"a{i}" for i in range(args.adapters)]
    mixed_jobs = [(names[i % args.adapters], prompt) for i, prompt in enumerate(prompts)]
    one_jobs = [(names[0], prompt) for prompt in prompts]
    paths = peft_adapters(model, args.adapters, args.rank, folder)
    ours = {name: peft_format.read(path, base=folder / "base") for name, path in zip(names, paths)}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), paths[0], adapter_name=names[0]).eval()
    for name, path in zip(names[1:], paths[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    if args.onnx:
        started = time.perf_counter()
        export_onnx(folder / "base", list(ours.values()), folder / "onnx", merged=False, names=names, bank=True,
                    cache=True)
        print(f"exported the bank graph in {time.perf_counter() - started:.0f} s")

    rows = {"mixed": (mixed_jobs, args.clients), "one at a time": (mixed_jobs, 1),
            "one adapter": (one_jobs, args.clients), "PEFT adapter_names": (mixed_jobs, None)}
    if args.onnx:
        rows.update({"ONNX mixed": (mixed_jobs, args.clients), "ONNX one adapter": (one_jobs, args.clients)})
    results = {}
    for _ in range(args.rounds):  # the rows take turns; each keeps its best round (the machine's load varies)
        for label, (jobs, batch) in rows.items():
            if batch is None:
                run_peft(peft_model, jobs[:args.clients], args.clients, 2)  # warm up
                result = run_peft(peft_model, jobs, args.clients, args.max_tokens)
            else:
                served = OnnxModel(folder / "onnx") if label.startswith("ONNX") else model
                engine = Engine(served, ours, max_batch=batch, max_waiting=args.requests)
                engine.start()
                run_engine(engine, jobs[:batch], min(batch, args.clients), 2)  # warm up
                result = run_engine(engine, jobs, args.clients, args.max_tokens)
                engine.stop()
            if label not in results or result[1] / result[0] > results[label][1] / results[label][0]:
                results[label] = result

    same = sum(results["mixed"][3][i] == results["PEFT adapter_names"][3][i] for i in range(len(prompts)))
    print(f"{args.adapters} LoRA adapters (rank {args.rank}, q/k/v/o) on a {args.layers}-layer {args.hidden}-hidden "
          f"Llama; {args.requests} requests of 8-32 prompt tokens and {args.max_tokens} new tokens, greedy; "
          f"{args.clients} concurrent clients; {torch.get_num_threads()} torch threads")
    print(f"{'':<20} {'tokens/s':>10} {'p50 s':>8} {'p99 s':>8}")
    rates = {}
    for label, (seconds, tokens, latencies, _) in results.items():
        rates[label] = tokens / seconds
        print(f"{label:<20} {rates[label]:>10.1f} {statistics.median(latencies):>8.3f} "
              f"{percentile(latencies, 0.99):>8.3f}")
    print(f"mixed / one adapter: {rates['mixed'] / rates['one adapter']:.2f}× (target ≥ 0.8)")
    print(f"mixed / one at a time: {rates['mixed'] / rates['one at a time']:.2f}× (target ≥ 3)")
    print(f"mixed / PEFT adapter_names: {rates['mixed'] / rates['PEFT adapter_names']:.2f}×")
    print(f"answers equal to PEFT's (greedy, same adapter): {same} of {len(prompts)}")
    if args.onnx:
        print(f"ONNX mixed / ONNX one adapter: {rates['ONNX mixed'] / rates['ONNX one adapter']:.2f}×; "
              f"ONNX mixed / torch mixed: {rates['ONNX mixed'] / rates['mixed']:.2f}×")
        same = sum(results["ONNX mixed"][3][i] == results["PEFT adapter_names"][3][i] for i in range(len(prompts)))
        print(f"ONNX answers equal to PEFT's: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
