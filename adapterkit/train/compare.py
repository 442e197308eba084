"""Compare fine-tuning methods under one budget, on the five criteria of Lialin et al. 2023 ("Scaling Down to Scale
Up: A Guide to Parameter-Efficient Fine-Tuning"): storage, memory, training time, quality, inference cost.

Each method trains, over each base precision (:mod:`adapterkit.precision`), in its own Python process
(``python -m adapterkit.train.compare CONFIG``), so its memory is its own. Memory is the operating system's peak
resident set (``resource.getrusage(...).ru_maxrss``): tracemalloc does not see torch's allocations. The worker notes
its resident set once its libraries are imported (the *baseline*), loads the base model alone in the precision and
notes the peak, then frees it and trains. Reported:

- *training memory*: how far training raised the peak above holding the model (activations, gradients, optimiser
  state, adapter copies);
- *peak training memory*: the process's peak above the baseline, everything training held at once, the weights too;
- *weight memory*: the bytes the base model's weights take as held in that precision (a quantized weight by its
  packed data and scales), the memory inference needs for them;
- their ratio, peak training memory / weight memory: the survey's measure (Lialin et al. §2: full fine-tuning with
  Adam needs 12-20 times the weights' memory; PEFT methods and a quantized base bring it down);
- *peak RSS*, the whole process's peak.

Inference latency is the median time of one forward pass on an evaluation batch, with the trained adapter attached
and without it, in alternating rounds in the same process (the best round of each counts).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from adapterkit.errors import RequestError
from adapterkit.precision import check as check_precision
from adapterkit.io.adapter_file import save
from adapterkit.io.outputs import output

RESULTS, PLOT = "compare.json", "compare.png"
LATENCY_RUNS = 20
LATENCY_ROUNDS = 3
COLUMNS = [  # (key, heading, format)
    ("method", "method", "{}"),
    ("base_precision", "base", "{}"),
    ("storage_ratio", "storage vs base", "{:.2%}"),
    ("train_memory_mb", "train mem MB", "{:.0f}"),
    ("peak_train_memory_mb", "peak train MB", "{:.0f}"),
    ("weight_memory_mb", "weights MB", "{:.1f}"),
    ("memory_ratio", "peak/weights", "{:.1f}x"),
    ("seconds_per_step", "s/step", "{:.3f}"),
    ("quality", "eval", "{}"),
    ("latency_ratio", "latency vs base", "{:.2f}x"),
]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def median_forward_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    times = []
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # warm-up
        for _ in range(LATENCY_RUNS):
            started = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(base: str, config, output: str) -> dict:
    """Train one method over one base precision (in this process) and measure it; saves the adapter to ``output``."""
    from adapterkit.attach import attach
    from adapterkit.precision import held_bytes, holds_linear_weights
    from adapterkit.train.base import load_base
    from adapterkit.train.data import Collator, load_examples
    from adapterkit.train.loop import train

    baseline = peak_rss_mb()  # the interpreter and its libraries (imported above and by the caller)
    precision = config.base_precision
    label_field = config.label_field if config.task == "classify" else None
    labels = load_examples(config.data, config.text_field, label_field).labels
    loaded = load_base(base, config.task, labels, precision=precision)
    weight_bytes = held_bytes(loaded.model)
    del loaded
    gc.collect()
    holding_model = peak_rss_mb()
    result = train(base, config, progress=False)
    training_peak = peak_rss_mb()
    save(result.adapter, output)

    loaded = load_base(base, config.task, labels, precision=precision)
    loaded.model.eval()
    examples = load_examples(config.eval_data or config.data, config.text_field, label_field, labels)
    batch = Collator(examples, loaded.tokenizer)(list(range(min(config.batch_size, len(examples)))))
    base_latency, attached_latency = float("inf"), float("inf")
    options = {"dtype": torch.float32 if precision != "float32" else None,
               "reference": base if holds_linear_weights(precision) else None}
    for _ in range(LATENCY_ROUNDS):  # alternate, keep the best round of each: other load on the machine only adds
        base_latency = min(base_latency, median_forward_seconds(loaded.model, batch))
        with attach(loaded.model, result.adapter, **options):
            attached_latency = min(attached_latency, median_forward_seconds(loaded.model, batch))
    base_bytes = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
    peak_train_memory = training_peak - baseline
    return {
        "method": config.method,
        "base_precision": precision,
        "adapter_file": os.path.basename(output),
        "adapter_bytes": os.path.getsize(output),
        "base_bytes": base_bytes,
        "storage_ratio": os.path.getsize(output) / base_bytes,
        "trainable_parameters": result.adapter.parameter_count(),
        "train_memory_mb": training_peak - holding_model,
        "peak_train_memory_mb": peak_train_memory,
        "weight_memory_mb": weight_bytes / (1 << 20),
        "memory_ratio": peak_train_memory / (weight_bytes / (1 << 20)),
        "baseline_rss_mb": baseline,
        "peak_rss_mb": training_peak,
        "steps": result.steps,
        "seconds_per_step": result.seconds / result.steps,
        "eval": result.history[-1] if result.history else None,
        "base_latency_s": base_latency,
        "attached_latency_s": attached_latency,
        "latency_ratio": attached_latency / base_latency,
    }


def adapter_name(method: str, precision: str) -> str:
    """The file a method's adapter is written to: ``lora.safetensors`` over float32, ``lora-nf4.safetensors``..."""
    return f"{method}.safetensors" if precision == "float32" else f"{method}-{precision}.safetensors"


def compare(base: str, config, methods: list[str], out_dir: str, progress=None, overwrite: bool = False,
            precisions: list[str] | None = None, settings: dict[str, dict] | None = None) -> list[dict]:
    """Train every method of ``methods`` over every base precision of ``precisions`` (default: the config's) with
    ``config`` (its ``method`` and ``base_precision`` replaced, and the fields ``settings`` gives for that method, e.g.
    ``{"bitfit": {"lr": 3e-3}}``), each in a fresh process; write the adapters,
    ``compare.json`` and ``compare.png`` into ``out_dir`` (all at once, through the output discipline) and return one
    row per method and precision. ``progress(method, precision)`` is called before each."""
    config = config.checked()
    precisions = [check_precision(p) for p in (precisions or [config.base_precision])]
    inputs = [base, config.data, *([config.eval_data] if config.eval_data else [])]
    rows = []
    with output(out_dir, inputs=inputs, folder=True, overwrite=overwrite, owned=[RESULTS]) as folder:
        for method in methods:
            for precision in precisions:
                if progress is not None:
                    progress(method, precision)
                job = {"base": os.fspath(base),
                       "config": dataclasses.asdict(dataclasses.replace(
                           config, method=method, base_precision=precision, **(settings or {}).get(method, {}))),
                       "output": os.fspath(folder / adapter_name(method, precision))}
                done = subprocess.run([sys.executable, "-m", "adapterkit.train.compare", json.dumps(job)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    raise RequestError(f"training {method} over a {precision} base for the comparison failed: {last}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        (folder / RESULTS).write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
        plot(rows, folder / PLOT)
    return rows


def quality(row: dict) -> str:
    metrics = row.get("eval") or {}
    if "accuracy" in metrics:
        return f"acc {metrics['accuracy']:.3f}"
    return f"loss {metrics['loss']:.3f}" if "loss" in metrics else "-"


def table(rows: list[dict]) -> str:
    cells = [[heading for _, heading, _ in COLUMNS]]
    for row in rows:
        cells.append([quality(row) if key == "quality" else form.format(row[key]) for key, _, form in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells)


def plot(rows: list[dict], path) -> None:
    """Bar charts, one per criterion (the five, and the ratio of peak training memory to weight memory), side by
    side, one bar per method and precision, saved as a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RequestError("the comparison plot needs matplotlib: pip install matplotlib (or adapterkit[dev])") from None
    methods = [row["method"] if row.get("base_precision", "float32") == "float32" and
               len({r.get("base_precision", "float32") for r in rows}) == 1 else
               f"{row['method']} {row.get('base_precision', 'float32')}" for row in rows]
    quality_key = "accuracy" if all("accuracy" in (r.get("eval") or {}) for r in rows) else "loss"
    panels = [
        ("storage (adapter / base)", [r["storage_ratio"] for r in rows]),
        ("peak training memory (MB)", [r["peak_train_memory_mb"] for r in rows]),
        ("peak training / weight memory", [r["memory_ratio"] for r in rows]),
        ("seconds per step", [r["seconds_per_step"] for r in rows]),
        (f"eval {quality_key}", [(r.get("eval") or {}).get(quality_key, float("nan")) for r in rows]),
        ("latency (attached / base)", [r["latency_ratio"] for r in rows]),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (title, values) in zip(axes, panels):
        axis.bar(methods, values, color="tab:blue")
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def _worker(job_json: str) -> None:
    from adapterkit.train.loop import TrainConfig

    job = json.loads(job_json)
    torch.manual_seed(0)
    row = measure(job["base"], TrainConfig(**job["config"]), job["output"])
    sys.stdout.write(json.dumps(row) + "\n")  # the parent process reads this one line


if __name__ == "__main__":
    _worker(sys.argv[1])
