"""The training loop: a new adapter attached to the frozen base, AdamW on the adapter's parameters only.

Scale-out: run the same command under ``torchrun --nproc_per_node N``. Each process then trains on its share of
every global batch (``DistributedSampler``; gloo on CPU, NCCL on GPU) and the gradients are summed across processes
before each step, which is what ``DistributedDataParallel`` does. We reduce the adapter's gradients ourselves (one
flat all-reduce per step) rather than wrapping the model in DDP because the trainable tensors belong to the attached
adapter, not to the base model's own parameter set; it also keeps the frozen base out of DDP's bookkeeping. Each
process's loss is the sum of its example losses divided by the *global* batch size, so the summed gradient equals the
single-process gradient of the same global batch: with the same seed, N processes reproduce a one-process run (up to
float rounding), as long as the model has no dropout. Only rank 0 shows progress, evaluates and returns the adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from adapterkit import precision
from adapterkit.adapter import Adapter
from adapterkit.attach import attach
from adapterkit.errors import RequestError
from adapterkit.io.digest import sha256_of
from adapterkit.kinds import get_kind
from adapterkit.manifest import Manifest
from adapterkit.train.base import base_record, load_base
from adapterkit.train.data import Collator, load_examples
from adapterkit.train.evaluate import evaluate, example_losses
from adapterkit.train.init import new_components, option_defaults
from adapterkit.values import count, number

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    method: str
    task: str
    data: str
    eval_data: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    targets: list[str] | None = None
    #: the kinds' hyper-parameters (rank, alpha, prefix_length, ...): missing ones take their defaults
    options: dict = field(default_factory=dict)
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    lr: float | None = None  # None: the method's default (its kind's default_lr)
    batch_size: int = 16  # global: split across processes
    seed: int = 0
    #: the precision the frozen base is held in (adapterkit.precision): float32, bfloat16, int8 or nf4
    base_precision: str = "float32"
    #: recompute each layer's activations in the backward pass instead of keeping them (QLoRA's setting)
    gradient_checkpointing: bool = False

    def checked(self) -> "TrainConfig":
        """This config with every number checked (counts ≥ 1, finite rates in range) before any work starts."""
        options = {**option_defaults(), **self.options}
        for kind_option in (o for kind in [get_kind(self.method)] for o in kind.train_options):
            value = options[kind_option.name]
            options[kind_option.name] = (count(value, f"--{kind_option.name.replace('_', '-')}")
                                         if kind_option.kind == "count" else
                                         number(value, f"--{kind_option.name.replace('_', '-')}", kind_option.low,
                                                kind_option.high))
        return dataclasses.replace(
            self, options=options, epochs=count(self.epochs, "--epochs"),
            steps=None if self.steps is None else count(self.steps, "--steps"),
            lr=None if self.lr is None else number(self.lr, "--lr", 0, 10, low_open=True),
            batch_size=count(self.batch_size, "--batch-size"), seed=count(self.seed, "--seed", low=0),
            base_precision=precision.check(self.base_precision))


@dataclass
class TrainResult:
    adapter: Adapter | None  # None on ranks other than 0
    steps: int
    seconds: float  # wall time of the optimisation steps (no evaluation)
    history: list[dict] = field(default_factory=list)  # eval metrics after each epoch

    @property
    def is_main(self) -> bool:
        return self.adapter is not None


@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device


@contextmanager
def processes():
    """This process's place among ``torchrun``'s (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world_size == 1:
        yield Processes(0, 1, device)
        return
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Processes(dist.get_rank(), world_size, device)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of ``parameters`` across processes, as one flat tensor."""
    grads = [p.grad for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each decoder layer's input and recompute its activations in the backward pass, as QLoRA trains
    (Dettmers et al. 2023): transformers' own activation checkpointing (``gradient_checkpointing_enable`` before
    5.24), non-reentrant (``torch.utils.checkpoint`` with ``use_reentrant=False``, which gives the adapter's
    parameters their gradients although no layer input needs one). It is on only in training mode."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RequestError(f"{type(model).__name__} does not support gradient checkpointing")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def train(base: str | os.PathLike, config: TrainConfig, on_eval=None, progress: bool = True) -> TrainResult:
    """Train a new ``config.method`` adapter on the base model folder ``base``. ``on_eval(epoch, metrics)`` is called
    on rank 0 after each epoch's evaluation."""
    config = config.checked()
    labels_field = config.label_field if config.task == "classify" else None
    examples = load_examples(config.data, config.text_field, labels_field)
    eval_examples = (load_examples(config.eval_data, config.text_field, labels_field, examples.labels)
                     if config.eval_data else None)
    lr = config.lr if config.lr is not None else get_kind(config.method).default_lr
    with processes() as procs:
        if config.batch_size % procs.world_size:
            raise RequestError(f"batch size {config.batch_size} does not split evenly over {procs.world_size} "
                               "processes")
        loaded = load_base(base, config.task, examples.labels, config.seed, config.base_precision, procs.device)
        model = loaded.model.to(procs.device).requires_grad_(False).train()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        components, tensors = new_components(
            model, config.method, targets=config.targets, options=config.options, head=loaded.head,
            generator=torch.Generator().manual_seed(config.seed))
        base_model = base_record(base, loaded.head)
        if get_kind(config.method).replaces:  # every base tensor is replaced: there is no base left to check
            base_model.fingerprint, base_model.fingerprints = None, {}
        adapter = Adapter(Manifest(components=components, base_model=base_model), tensors)
        # The adapter's tensors train in float32 over any precision. Attach also checks the model against the folder's
        # fingerprint; a model whose linear weights are held converted no longer gives them back: then the folder is
        # checked.
        held = precision.holds_linear_weights(config.base_precision, procs.device)
        handle = attach(model, adapter, trainable=True, dtype=torch.float32, reference=base if held else None)
        parameters = list(handle.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)

        sampler = DistributedSampler(range(len(examples)), num_replicas=procs.world_size, rank=procs.rank,
                                     shuffle=True, seed=config.seed, drop_last=True)
        loader = DataLoader(range(len(examples)), batch_size=config.batch_size // procs.world_size, sampler=sampler,
                            collate_fn=Collator(examples, loaded.tokenizer), drop_last=True)
        if len(loader) == 0:
            raise RequestError(f"{len(examples)} examples make no batch of {config.batch_size}: pass a smaller "
                               "--batch-size", config.data)
        total_steps = config.steps or config.epochs * len(loader)
        epochs = math.ceil(total_steps / len(loader))
        main = procs.rank == 0
        bar = tqdm(total=total_steps, desc=f"train {config.method}", disable=None if progress and main else True, leave=False)  # None: only on a terminal
        step, seconds, history = 0, 0.0, []
        torch.manual_seed(config.seed)  # dropout masks follow the seed, whatever loading consumed before
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            started = time.perf_counter()
            for batch in loader:
                if step == total_steps:
                    break
                batch = {k: v.to(procs.device) for k, v in batch.items()}
                losses, _ = example_losses(model, batch, config.task)
                (losses.sum() / config.batch_size).backward()
                if procs.world_size > 1:
                    sum_gradients(parameters)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses.mean().item():.4f}")
            seconds += time.perf_counter() - started
            if main and eval_examples is not None:
                metrics = evaluate(model, loaded.tokenizer, eval_examples, config.task, device=procs.device)
                history.append({"epoch": epoch + 1, "step": step, **metrics})
                log.info("epoch %d (step %d): %s", epoch + 1, step, metrics)
                if on_eval is not None:
                    on_eval(epoch + 1, metrics)
        bar.close()
        trained = handle.to_adapters()[0] if main else None
        handle.detach()
    if trained is not None:
        trained.manifest.training = training_record(config, lr, step, epochs, examples.labels, history)
    return TrainResult(trained, step, seconds, history)


def training_record(config: TrainConfig, lr: float, steps: int, epochs: int, labels, history) -> dict:
    record = {
        "method": config.method, "task": config.task, "steps": steps, "epochs": epochs, "lr": lr,
        "batch_size": config.batch_size, "seed": config.seed, "base_precision": config.base_precision,
        "gradient_checkpointing": config.gradient_checkpointing,
        "data": {"file": os.path.basename(config.data), "sha256": sha256_of(config.data)},
    }
    if config.eval_data:
        record["eval_data"] = {"file": os.path.basename(config.eval_data), "sha256": sha256_of(config.eval_data)}
    if labels:
        record["labels"] = list(labels)
    if history:
        record["eval"] = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")}
    return record
