"""The generation engine behind ``adapterkit serve``: one base model, many adapters, one batch.

Every request is a row of one running batch, using its own adapter: through a per-row attach in torch
(:mod:`adapterkit.attach.rows`), or an ONNX graph's adapter bank (:mod:`adapterkit.serve.models`). One thread runs
token steps; at each step

1. adapters added or removed since the last step are attached (a removed one stays until its last row is done);
2. waiting requests join: their prompts are prefilled together (left-padded), and their key/value caches, padded on
   the left to the batch's length, are appended to the batch's (the padding masked);
3. every row feeds the token it got last, and gets its next one (greedy, or sampled with its own seed);
4. finished rows leave: their cache rows are dropped, and cache columns no row uses any more are cut.

So a request never waits for another to finish: it joins at the next step (continuous batching, as vLLM's). Each row
is numbered as alone (positions 0..n-1 after its own prompt, shifted by its prefix as attach shifts them), so its
tokens are the ones ``generate`` gives with its adapter attached alone.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from adapterkit.adapter import Adapter
from adapterkit.errors import RequestError
from adapterkit.kinds import get_kind
from adapterkit.serve.models import OnnxModel, TorchModel

log = logging.getLogger(__name__)


class Busy(Exception):
    """The engine's waiting queue is full: the request is refused now (HTTP 503), not queued without bound."""


class Gone(Exception):
    """A request ended without its answer: its adapter was removed, the server is stopping, or a step failed."""


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 0.0  #: 0: greedy (the most likely token)
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Request:
    """One completion: its adapter (None: the base), prompt token ids and sampling; ``listener(token, reason,
    error)`` hears each new token (reason None), then the end: a finish reason (``length``, ``stop``) or an error."""

    adapter: str | None
    prompt: list[int]
    sampling: Sampling
    listener: Callable[[int | None, str | None, Exception | None], None]
    cancelled: bool = False


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    length: int = 0  #: tokens of this row in the cache (its next position)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``tensor`` padded with zeros at the start of dimension ``dim`` to ``length``."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.ndim - 1 - dim % tensor.ndim) + [missing, 0]
    return F.pad(tensor, pad)


class Engine:
    """Runs requests on ``model`` (a transformers causal LM, or an :class:`~adapterkit.serve.models.OnnxModel`) with
    ``adapters`` ({name: adapter}) in one batch of at most ``max_batch`` rows; at most ``max_waiting`` requests wait
    to join (more are refused with :class:`Busy`)."""

    def __init__(self, model: torch.nn.Module | OnnxModel, adapters: dict[str, Adapter] | None = None, *,
                 max_batch: int = 16, max_waiting: int = 64, force: bool = False):
        self.model = TorchModel(model, force) if isinstance(model, torch.nn.Module) else model
        self.max_batch = max_batch
        self.max_length, self.eos = self.model.max_length, self.model.eos
        self._waiting: queue.Queue[Request] = queue.Queue(maxsize=max_waiting)
        self._changes: queue.Queue[tuple[Callable[[], None], Future]] = queue.Queue()
        self._wanted: dict[str, Adapter] = {}  # what requests may name
        self._attached: dict[str, Adapter] = {}  # what the model holds (and a removed one still in use)
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [rows, cached positions]: 1 where a row has a token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapterkit-engine", daemon=True)
        self._wanted.update(adapters or {})
        self._attach(dict(self._wanted))  # a bad adapter fails here, before serving

    # -- from any thread --------------------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self._wanted)

    def positions(self, adapter: str | None) -> int:
        """The positions an adapter takes before the tokens (its prefixes)."""
        if adapter is None:
            return 0
        return max((get_kind(c.kind).positions(c) for c in self._wanted[adapter].components), default=0)

    def check(self, adapter: str | None, prompt: Sequence[int], sampling: Sampling) -> None:
        """Refuse (RequestError, one line) a request this engine cannot run."""
        if adapter is not None and adapter not in self._wanted:
            raise KeyError(adapter)
        if not prompt:
            raise RequestError("the prompt is empty")
        vocabulary = self.model.vocab_size
        if any(not 0 <= token < vocabulary for token in prompt):
            raise RequestError(f"a prompt token is outside the vocabulary (0..{vocabulary - 1})")
        needed = len(prompt) + sampling.max_tokens + self.positions(adapter)
        if self.max_length is not None and needed > self.max_length:
            raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) is more "
                               f"than the model's {self.max_length - self.positions(adapter)} positions")

    def submit(self, request: Request) -> None:
        """Queue ``request`` to join the batch at the next step; :class:`Busy` when the queue is full."""
        if self._stop.is_set():
            raise Gone("the server is stopping")
        self.check(request.adapter, request.prompt, request.sampling)
        try:
            self._waiting.put_nowait(request)
        except queue.Full:
            raise Busy(f"{self._waiting.maxsize} requests are already waiting: try again shortly") from None

    def add(self, name: str, adapter: Adapter) -> Future:
        """Add an adapter between two steps; the future fails (RequestError) if it does not fit the base."""
        return self._change(lambda: self._add(name, adapter))

    def remove(self, name: str) -> Future:
        """Stop taking requests for an adapter; rows already running on it finish."""
        return self._change(lambda: self._remove(name))

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": self._waiting.qsize(), "adapters": len(self._wanted)}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the step under way, then end every request still running or waiting ("the server is stopping")."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._end_all(Gone("the server is stopping"))
        self.model.detach()

    # -- the engine's thread ----------------------------------------------------------------------------------------

    def _change(self, change: Callable[[], None]) -> Future:
        future: Future = Future()
        if not self._thread.is_alive():  # not started (or stopped): nothing else touches the model
            self._run_change(change, future)
        else:
            self._changes.put((change, future))
        return future

    @staticmethod
    def _run_change(change, future: Future) -> None:
        try:
            future.set_result(change())
        except Exception as exc:  # reported to the caller, who answers the client
            future.set_exception(exc)

    def _add(self, name: str, adapter: Adapter) -> None:
        if name in self._wanted or name in self._attached:
            raise RequestError(f"an adapter named {name!r} is already loaded")
        self._attach({**self._attached, name: adapter})  # refuses an adapter for another base, as attach does
        self._wanted[name] = adapter

    def _remove(self, name: str) -> None:
        if self._wanted.pop(name, None) is None:
            raise KeyError(name)

    def _attach(self, adapters: dict[str, Adapter]) -> None:
        """Make ``adapters`` the model's, in place of the current set (kept when the new one is refused)."""
        self.model.attach(adapters)
        self._attached = dict(adapters)
        log.info("adapters attached: %s", ", ".join(adapters) or "none")

    def _loop(self) -> None:
        while not self._stop.is_set():
            while not self._changes.empty():
                self._run_change(*self._changes.get())
            if not self._rows and self._waiting.empty():
                self._stop.wait(0.005)  # idle: look again shortly
                continue
            try:
                self._step()
            except Exception as exc:  # a bug or an exhausted device: the rows fail, the server goes on
                log.exception("a generation step failed")
                self._end_all(Gone(f"generation failed: {type(exc).__name__}: {exc}"), waiting=False)

    def _step(self) -> None:
        in_use = {row.request.adapter for row in self._rows}
        wanted = {**self._wanted, **{n: a for n, a in self._attached.items() if n in in_use}}
        if wanted.keys() != self._attached.keys():
            self._attach(wanted)
        joining = []
        while len(self._rows) + len(joining) < self.max_batch:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:
                continue
            if request.adapter is not None and request.adapter not in self._attached:
                request.listener(None, None, Gone(f"the adapter {request.adapter!r} was removed"))
                continue
            seed = request.sampling.seed
            generator = None if seed is None else torch.Generator(self._device).manual_seed(seed)
            joining.append(_Row(request, generator))
        if joining:
            self._prefill(joining)
            self._leave()
        if self._rows:
            self._decode()
            self._leave()

    @property
    def _device(self) -> torch.device:
        return self.model.device

    def _forward(self, rows, ids, mask, positions, cache) -> torch.Tensor:
        return self.model.forward([row.request.adapter for row in rows], ids, mask, positions, cache)

    def _prefill(self, joining: list[_Row]) -> None:
        device = self._device
        longest = max(len(row.request.prompt) for row in joining)
        ids = torch.zeros(len(joining), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(joining), longest, dtype=torch.long, device=device)
        for i, row in enumerate(joining):
            prompt = row.request.prompt
            ids[i, longest - len(prompt):] = torch.tensor(prompt, device=device)
            mask[i, longest - len(prompt):] = 1
            row.length = len(prompt)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row numbered from 0, as alone
        logits, cache = self._forward(joining, ids, mask, positions, None)
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:  # append the new rows, both caches padded on the left to one length
            length = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, length, 2), _left_pad(new.keys, length, 2)])
                old.values = torch.cat([_left_pad(old.values, length, 2), _left_pad(new.values, length, 2)])
            self._mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(mask, length, 1)])
        self._rows += joining
        self._emit(joining, logits)

    def _decode(self) -> None:
        rows, device = self._rows, self._device
        ids = torch.tensor([[row.tokens[-1]] for row in rows], device=device)
        positions = torch.tensor([[row.length] for row in rows], device=device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype, device=device)], dim=1)
        logits, self._cache = self._forward(rows, ids, mask, positions, self._cache)
        self._mask = mask
        for row in rows:
            row.length += 1
        self._emit(rows, logits)

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, and tell its listener."""
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            sampling = row.request.sampling
            if sampling.temperature > 0:
                chosen[i] = _sample(logits[i], sampling, row.generator)
            row.tokens.append(chosen[i])
            if chosen[i] in self.eos:
                row.request.listener(None, "stop", None)
            else:
                row.request.listener(chosen[i], None, None)
                if len(row.tokens) >= sampling.max_tokens:
                    row.request.listener(None, "length", None)

    def _leave(self) -> None:
        """Drop the rows that are done (or whose client left), and the cache columns no remaining row uses."""
        keep = [i for i, row in enumerate(self._rows) if not self._done(row)]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        first = int(self._mask[index].any(0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask = self._mask[index, first:]

    def _done(self, row: _Row) -> bool:
        return (row.request.cancelled or len(row.tokens) >= row.request.sampling.max_tokens
                or (bool(row.tokens) and row.tokens[-1] in self.eos))

    def _end_all(self, error: Exception, waiting: bool = True) -> None:
        for row in self._rows:
            row.request.listener(None, None, error)
        self._rows, self._cache, self._mask = [], None, None
        while waiting:
            try:
                self._waiting.get_nowait().listener(None, None, error)
            except queue.Empty:
                break


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """A token drawn from softmax(logits / T), restricted to the smallest set of most likely tokens whose probability
    reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = probabilities.sort(descending=True)
        outside = ordered.cumsum(0) - ordered >= sampling.top_p  # the tokens after the nucleus is full
        probabilities = probabilities.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probabilities, 1, generator=generator))
