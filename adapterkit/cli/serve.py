"""adapterkit serve: an OpenAI-compatible completions server for a base model and its adapters."""

from __future__ import annotations

import os
import socket

import click

from adapterkit.cli.options import COUNT, FORCE
from adapterkit.errors import RequestError


@click.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1)
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 opens it to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="Port to listen on.")
@click.option("--name", default=None, help="The base's model id in the API [default: the folder's name].")
@click.option("--max-batch", type=COUNT, default=16, help="Most requests generated together in one batch.")
@click.option("--max-waiting", type=COUNT, default=64,
              help="Most requests waiting to join the batch; more are refused with 503.")
@FORCE
def serve(base, adapters, host, port, name, max_batch, max_waiting, force) -> None:
    """Serve BASE (a Hugging Face causal LM folder, or a folder exported with `export --onnx --unmerged --bank
    --cache`, run in ONNX Runtime) with ADAPTERS (NAME=FILE, or FILE named after its stem; FILE may be an hf://
    reference; an ONNX folder serves these too, not its own adapter files): POST /v1/completions with "model" set to an adapter's name (or the base's), GET /v1/models, POST
    /v1/load_lora_adapter and /v1/unload_lora_adapter, GET /health. Requests on different adapters are generated in
    one batch."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RequestError("adapterkit serve needs starlette and uvicorn: pip install 'adapterkit[serve]'") from None
    from adapterkit.onnx.export import adapter_names
    from adapterkit.serve.app import Server, http_server
    from adapterkit.serve.engine import Engine
    from adapterkit.sources import load_adapter

    named = [ref.partition("=") if "=" in ref and not ref.startswith("hf://") else ("", "", ref) for ref in adapters]
    refs = [ref for _, _, ref in named]
    names = [given or stem for (given, _, _), stem in zip(named, adapter_names(refs))]
    if len(set(names)) != len(names):
        raise click.BadParameter("two adapters have one name: name them NAME=FILE", param_hint="ADAPTERS")
    try:  # listen first: a port in use is refused before the model loads
        listening = socket.create_server((host, port))
    except OSError as exc:
        raise RequestError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    onnx = os.path.isfile(os.path.join(base, "model.onnx"))
    model, tokenizer = _onnx_model(base, force) if onnx else _torch_model(base)
    engine = Engine(model, {n: load_adapter(ref) for n, ref in zip(names, refs)}, max_batch=max_batch,
                    max_waiting=max_waiting, force=force)
    model_name = name or os.path.basename(os.path.normpath(base))
    server = Server(engine, model_name, tokenizer, load_adapter)
    port = listening.getsockname()[1]  # the one the system chose for --port 0
    click.echo(f"serving {model_name} with {len(names)} adapter{'' if len(names) == 1 else 's'}"
               f"{': ' + ', '.join(names) if names else ''} on http://{host}:{port} (Ctrl-C stops)")
    http_server(server, host, port).run(sockets=[listening])
    click.echo("stopped")


def _torch_model(base: str):
    from adapterkit.train.base import load_base

    loaded = load_base(base, "causal-lm")
    return loaded.model, loaded.tokenizer


def _onnx_model(folder: str, force: bool):
    """The exported graph and, where the base it was exported from is still there with a tokenizer, its tokenizer
    (else prompts are token ids)."""
    from adapterkit.onnx import require_onnxruntime
    from adapterkit.serve.models import OnnxModel

    require_onnxruntime()
    model = OnnxModel(folder, force)
    base = model.runner.description.get("base")
    try:
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError):
        return model, None
