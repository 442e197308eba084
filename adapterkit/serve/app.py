"""The HTTP face of ``adapterkit serve``: an OpenAI-compatible completions API (starlette, run by uvicorn).

- ``POST /v1/completions``: ``model`` names an adapter (as in vLLM and LoRAX) or the base; ``prompt`` is a string
  (with a tokenizer) or token ids; ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``seed``, ``stream``
  (server-sent events, ending with ``data: [DONE]``). Each choice also carries its ``token_ids``.
- ``GET /v1/models``: the base and its adapters.
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` (a file or an ``hf://`` reference; refused when made
  for another base) and ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``: adapters added and removed at run time,
  as vLLM names them.
- ``GET /health``: ``{"status": "ok", "running", "waiting", "adapters"}``.

A bad request gets a 4xx whose ``error.message`` is one line (unknown model: 404; bad JSON, bad field, too long a
prompt: 400); a full waiting queue gets 503. Nothing a client sends reaches the engine unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from adapterkit.errors import AdapterError
from adapterkit.serve.engine import Busy, Engine, Gone, Request, Sampling
from adapterkit.text import printable

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request answered with an HTTP error: its status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, printable(message)


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _field(body: dict, name: str, kind, default, check=None, rule: str = ""):
    """``body[name]`` (``default`` when absent or null) if it is a ``kind`` passing ``check``, else a 400."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or (check and not check(value)):
        raise Refused(400, f"{name} must be {rule or kind.__name__}, got {json.dumps(value)[:40]}")
    return value


class Server:
    """The routes over one :class:`Engine`; ``name`` is the base's model id, ``tokenizer`` may be None (prompts are
    then token ids, and answers carry ``token_ids`` and no text)."""

    def __init__(self, engine: Engine, name: str, tokenizer=None, load_adapter=None):
        self.engine, self.name, self.tokenizer = engine, name, tokenizer
        self.load_adapter = load_adapter  # ref -> Adapter (adapterkit.sources.load_adapter)
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload, methods=["POST"]),
        ], lifespan=self.lifespan, exception_handlers={Refused: self.refused})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:  # after uvicorn has let the requests under way finish (or timed out)
            await asyncio.to_thread(self.engine.stop)

    async def refused(self, request, exc: Refused) -> JSONResponse:
        return _error(exc.status, exc.message)

    async def health(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", **self.engine.stats()})

    async def models(self, request: HTTPRequest) -> JSONResponse:
        def entry(name, parent):
            return {"id": name, "object": "model", "created": 0, "owned_by": "adapterkit", "root": self.name,
                    "parent": parent}

        return JSONResponse({"object": "list", "data": [entry(self.name, None)]
                             + [entry(name, self.name) for name in self.engine.adapters]})

    async def load(self, request: HTTPRequest) -> JSONResponse:
        body = await self._body(request)
        name = _field(body, "lora_name", str, None, lambda v: v.strip() != "", "a non-empty string")
        path = _field(body, "lora_path", str, None, lambda v: v != "", "a non-empty string")
        if name is None or path is None:
            raise Refused(400, "give lora_name and lora_path")
        if name == self.name:
            raise Refused(400, f"{name!r} is the base model's name")
        try:
            adapter = await asyncio.to_thread(self.load_adapter, path)
            await asyncio.wrap_future(self.engine.add(name, adapter))
        except AdapterError as exc:  # not an adapter file, another base, does not fit, name taken
            raise Refused(400, str(exc)) from None
        except OSError as exc:
            raise Refused(400, f"{path}: {exc.strerror or exc}") from None
        log.info("adapter %s loaded from %s", name, path)
        return JSONResponse({"loaded": name})

    async def unload(self, request: HTTPRequest) -> JSONResponse:
        body = await self._body(request)
        name = _field(body, "lora_name", str, None)
        try:
            await asyncio.wrap_future(self.engine.remove(name))
        except KeyError:
            raise Refused(404, f"no adapter named {name!r} is loaded") from None
        return JSONResponse({"unloaded": name})

    async def completions(self, request: HTTPRequest):
        body = await self._body(request)
        model = _field(body, "model", str, None)
        if model is None:
            raise Refused(400, "model is required: the base's name or an adapter's (see /v1/models)")
        adapter = None if model == self.name else model
        prompt = self._prompt(body.get("prompt"))
        sampling = Sampling(
            max_tokens=_field(body, "max_tokens", int, 16, lambda v: v >= 1, "a whole number ≥ 1"),
            temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 100,
                                     "a number from 0 to 100")),
            top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
            seed=_field(body, "seed", int, None, lambda v: 0 <= v < 2 ** 63, "a whole number ≥ 0"))
        stream = _field(body, "stream", bool, False)
        if _field(body, "n", int, 1) != 1 or body.get("stop") or body.get("best_of") not in (None, 1):
            raise Refused(400, "n, best_of and stop are not supported: one completion per request, up to max_tokens")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(token, reason, error):  # called from the engine's thread
            with contextlib.suppress(RuntimeError):  # the event loop is gone (the server stopped)
                loop.call_soon_threadsafe(events.put_nowait, (token, reason, error))

        job = Request(adapter, prompt, sampling, listener)
        try:
            self.engine.submit(job)
        except KeyError:
            raise Refused(404, f"unknown model {model!r}: the base is {self.name!r}, the adapters are "
                               f"{', '.join(self.engine.adapters) or 'none'}") from None
        except AdapterError as exc:
            raise Refused(400, str(exc)) from None
        except (Busy, Gone) as exc:
            raise Refused(503, str(exc)) from None
        answer = _Answer(self, model, len(prompt))
        if stream:
            return StreamingResponse(answer.stream(job, events), media_type="text/event-stream")
        async for _ in answer.events(job, events):
            pass
        if answer.error is not None:
            return _error(503, str(answer.error))
        return JSONResponse(answer.chunk(self.text(answer.tokens), answer.reason, usage=True))

    async def _body(self, request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        return body

    def _prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise Refused(400, "this model has no tokenizer: send the prompt as token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise Refused(400, "prompt must be one string or one list of token ids")

    def text(self, tokens: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(tokens)


class _Answer:
    """One request's answer as it comes: its tokens, finish reason or error, and the OpenAI-shaped chunks."""

    def __init__(self, server: Server, model: str, prompt_tokens: int):
        self.server, self.model, self.prompt_tokens = server, model, prompt_tokens
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.error: Exception | None = None

    async def events(self, job: Request, events: asyncio.Queue):
        """Yields each new token until the request ends (then ``reason`` or ``error`` is set)."""
        while True:
            token, reason, error = await events.get()
            if token is not None:
                self.tokens.append(token)
                yield token
            elif error is not None:
                self.error = error
                return
            else:
                self.reason = reason
                return

    async def stream(self, job: Request, events: asyncio.Queue):
        sent = ""
        try:
            async for token in self.events(job, events):
                text = self.server.text(self.tokens)  # the whole text, so that multi-token characters come whole
                delta, sent = (text[len(sent):], text) if text.startswith(sent) else ("", sent)
                yield _sse(self.chunk(delta, None, [token]))
            if self.error is not None:
                yield _sse({"error": {"message": printable(str(self.error)), "type": "server_error", "code": 503}})
            else:
                yield _sse(self.chunk("", self.reason, [], usage=True))
            yield "data: [DONE]\n\n"
        finally:  # done, or the client left: the engine drops the row at its next step
            job.cancelled = True

    def chunk(self, text: str, reason: str | None, tokens: list[int] | None = None, usage: bool = False) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                             "token_ids": self.tokens if tokens is None else tokens}]}
        if usage:
            body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                             "total_tokens": self.prompt_tokens + len(self.tokens)}
        return body


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, allow_nan=False)}\n\n"


def http_server(server: Server, host: str = "127.0.0.1", port: int = 8000, graceful_s: float = 30.0):
    """The uvicorn server for ``server`` (``.run()`` serves until SIGINT or SIGTERM, or ``should_exit``); on
    shutdown it stops taking connections, lets the requests under way finish (up to ``graceful_s`` seconds), and
    stops the engine."""
    import uvicorn

    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=graceful_s)
    return uvicorn.Server(config)
