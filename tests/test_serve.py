"""adapterkit serve on loopback: many clients at once on mixed adapters (and some bad requests), each answer checked
against transformers' generate with that adapter alone attached to a separate copy of the base; adapters added and
removed while serving; a full queue answered 503; a clean shutdown that lets the request under way finish; the same
from an ONNX folder with an adapter bank, run in ONNX Runtime."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapterkit import save
from adapterkit.attach import attach
from adapterkit.onnx.export import export_onnx
from adapterkit.serve.app import Server, http_server
from adapterkit.serve.engine import Engine
from adapterkit.serve.models import OnnxModel
from adapterkit.sources import load_adapter
from adapterkit.train.base import load_base
from test_mixed_batch import VARIANTS, random_adapter

KINDS = {"lora-r4": ("lora", 0), "lora-r8": ("lora", 1), "prefix": ("prefix", 1), "ia3": ("ia3", 0),
         "dora": ("dora", 0), "bitfit": ("bitfit", 0)}
PROMPTS = ["hey ! sorry about the order", "dear customer , thank you for contacting us about your refund",
           "we will", "good afternoon . we apologise for the trouble with your password and we will fix it"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def served(example):
    """The base, its tokenizer and adapters, and a reference copy of the base that the server never touches."""
    base = load_base(example["llama"], "causal-lm")
    reference = load_base(example["llama"], "causal-lm").model
    adapters = {name: random_adapter(kind, "llama", base.model, seed, VARIANTS[variant])
                for seed, (name, (kind, variant)) in enumerate(KINDS.items())}
    return base, reference, adapters


def expected_tokens(reference, adapter, ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy generation with ``adapter`` alone attached (None: the base), by transformers' generate."""
    inputs = torch.tensor([ids])
    with torch.no_grad(), (attach(reference, adapter) if adapter is not None else _nothing()):
        out = reference.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Running:
    """A server on a free loopback port, in a thread (uvicorn handles no signals outside the main thread)."""

    def __init__(self, server: Server):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.uvicorn = http_server(server, "127.0.0.1", self.port, graceful_s=10)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]})
        self.thread.start()
        while not self.uvicorn.started:
            self.thread.join(0.01)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def request(self, method: str, path: str, body=None, raw: bytes | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read().decode()
        connection.close()
        if response.getheader("content-type", "").startswith("text/event-stream"):
            events = [line[len("data: "):] for line in payload.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            return response.status, [json.loads(e) for e in events[:-1]]
        return response.status, json.loads(payload)


def completion(model: str, prompt, stream: bool = False, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream, **extra}


def streamed_tokens(chunks: list[dict]) -> tuple[list[int], str, str]:
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    return tokens, "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def test_many_clients_on_mixed_adapters_each_get_their_adapters_answer(served, tmp_path):
    base, reference, adapters = served
    tokenizer = base.tokenizer
    engine = Engine(base.model, {name: adapters[name] for name in list(KINDS)[:-1]}, max_batch=8, max_waiting=256)
    running = Running(Server(engine, "llama", tokenizer, load_adapter))
    try:
        status, models = running.request("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["llama", *list(KINDS)[:-1]]

        jobs = [(model, prompt, stream) for model in ["llama", *list(KINDS)[:-1]] for prompt in PROMPTS
                for stream in (False, True)]
        bad = [("POST", "/v1/completions", completion("nope", "hi"), None, 404),
               ("POST", "/v1/completions", None, b"{not json", 400),
               ("POST", "/v1/completions", completion("lora-r4", "we " * 200), None, 400),
               ("POST", "/v1/completions", completion("lora-r4", "hi", max_tokens=0), None, 400),
               ("POST", "/v1/completions", completion("lora-r4", [10 ** 6]), None, 400),
               ("POST", "/v1/completions", {"prompt": "hi"}, None, 400)]

        def good(job):
            model, prompt, stream = job
            return job, running.request("POST", "/v1/completions", completion(model, prompt, stream))

        def refused(case):
            method, path, body, raw, status = case
            return case, running.request(method, path, body, raw)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(good, jobs * 2))
            refusals = list(pool.map(refused, bad * 2))
        for (model, prompt, stream), (status, answer) in answers:
            assert status == 200, answer
            ids = tokenizer(prompt)["input_ids"]
            expected = expected_tokens(reference, adapters.get(model), ids)
            if stream:
                tokens, text, reason = streamed_tokens(answer)
            else:
                choice = answer["choices"][0]
                tokens, text, reason = choice["token_ids"], choice["text"], choice["finish_reason"]
                assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": MAX_TOKENS,
                                           "total_tokens": len(ids) + MAX_TOKENS}
            assert (tokens, text, reason) == (expected, tokenizer.decode(expected), "length"), (model, prompt)
        for (_, _, _, _, status), (got, answer) in refusals:
            assert got == status and "\n" not in answer["error"]["message"], answer

        # adapters come and go while serving
        save(adapters["bitfit"], tmp_path / "bitfit.safetensors")
        stranger = random_adapter("lora", "llama", __import__("tiny_models").llama(), 0, VARIANTS[0])
        save(stranger, tmp_path / "stranger.safetensors")
        assert running.request("POST", "/v1/load_lora_adapter",
                               {"lora_name": "bitfit", "lora_path": str(tmp_path / "bitfit.safetensors")})[0] == 200
        status, answer = running.request("POST", "/v1/load_lora_adapter",
                                         {"lora_name": "x", "lora_path": str(tmp_path / "stranger.safetensors")})
        assert status == 400 and "fingerprint" in answer["error"]["message"]
        ids = tokenizer(PROMPTS[0])["input_ids"]
        status, answer = running.request("POST", "/v1/completions", completion("bitfit", PROMPTS[0]))
        assert answer["choices"][0]["token_ids"] == expected_tokens(reference, adapters["bitfit"], ids)
        assert running.request("POST", "/v1/unload_lora_adapter", {"lora_name": "lora-r4"})[0] == 200
        assert running.request("POST", "/v1/completions", completion("lora-r4", PROMPTS[0]))[0] == 404
        status, answer = running.request("POST", "/v1/completions", completion("dora", PROMPTS[0]))
        assert answer["choices"][0]["token_ids"] == expected_tokens(reference, adapters["dora"], ids)
        status, health = running.request("GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["adapters"] == len(KINDS) - 1
    finally:
        running.stop()


def test_a_full_queue_answers_503_and_shutdown_lets_the_request_under_way_finish(served):
    base, reference, adapters = served
    engine = Engine(base.model, {"lora-r4": adapters["lora-r4"]}, max_batch=4, max_waiting=2)
    start = engine.start
    engine.start = lambda: None  # held: requests wait until the test starts the engine
    running = Running(Server(engine, "llama", base.tokenizer, load_adapter))
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(running.request, "POST", "/v1/completions",
                                completion("lora-r4", PROMPTS[i], stream=i == 1, max_tokens=40)) for i in range(2)]
            while running.request("GET", "/health")[1]["waiting"] < 2:
                pass
            status, answer = running.request("POST", "/v1/completions", completion("lora-r4", PROMPTS[2]))
            assert status == 503 and "waiting" in answer["error"]["message"]
            start()
            running.uvicorn.should_exit = True  # shut down while both are under way: they finish first
            answers = [future.result() for future in held]
        running.thread.join(30)
        assert not running.thread.is_alive()
    finally:
        running.stop()
    for i, (status, answer) in enumerate(answers):
        tokens = streamed_tokens(answer)[0] if i == 1 else answer["choices"][0]["token_ids"]
        ids = base.tokenizer(PROMPTS[i])["input_ids"]
        assert status == 200 and tokens == expected_tokens(reference, adapters["lora-r4"], ids, 40)


def test_an_onnx_bank_folder_serves_mixed_adapters_as_torch_does(served, example, tmp_path):
    base, reference, adapters = served
    tokenizer = base.tokenizer
    exported = ["lora-r8", "prefix", "ia3"]
    export_onnx(example["llama"], [adapters[name] for name in exported], tmp_path / "onnx", merged=False,
                names=exported, bank=True, cache=True)
    engine = Engine(OnnxModel(tmp_path / "onnx"), {name: adapters[name] for name in exported[:2]}, max_batch=8)
    running = Running(Server(engine, "llama", tokenizer, load_adapter))
    try:
        save(adapters["lora-r4"], tmp_path / "lora-r4.safetensors")  # another rank on the same modules, at run time
        assert running.request("POST", "/v1/load_lora_adapter",
                               {"lora_name": "lora-r4", "lora_path": str(tmp_path / "lora-r4.safetensors")})[0] == 200
        jobs = [(model, prompt) for model in ["llama", "lora-r8", "prefix", "lora-r4"] for prompt in PROMPTS]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda job: (job, running.request("POST", "/v1/completions", completion(*job))),
                                    jobs))
        for (model, prompt), (status, answer) in answers:
            expected = expected_tokens(reference, adapters.get(model), tokenizer(prompt)["input_ids"])
            assert status == 200 and answer["choices"][0]["token_ids"] == expected, (model, prompt)
    finally:
        running.stop()


def test_the_command_refuses_in_one_line_what_it_cannot_serve(tmp_path, tiny_llama_dir):
    from cli_runner import call_cli

    (tmp_path / "model.onnx").write_bytes(b"")
    result = call_cli("serve", tmp_path)
    assert result.returncode == 1 and "not an adapterkit ONNX export" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = call_cli("serve", tiny_llama_dir, "--port", taken.getsockname()[1])
    assert result.returncode == 1 and result.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert result.stderr.count("\n") == 1
