"""llama.cpp for the tests: base GGUFs of tiny models (written with the ``gguf`` package, no tokenizer), logits from
llama-cpp-python in a child process, and llama.cpp's own ``convert_lora_to_gguf.py`` when its source is present.

A base GGUF is written as llama.cpp's ``convert_hf_to_gguf.py`` writes it for these architectures (checked on this
kind of machine against the converter with its vocabulary step replaced by ``_set_vocab_none()``): the same
metadata, tensor names from the ``gguf`` tensor map, q/k rows permuted for ``llama``, Gemma's norms stored as 1 + w,
and a ``none`` tokenizer (llama.cpp then takes token ids as they are). The tests check the base's logits against
transformers before they check an adapter's.

llama.cpp runs in a child process: a GGML assertion aborts the whole process, which must not take pytest with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from adapterkit.converters.gguf import ARCHITECTURES, permute

#: where llama.cpp's conversion scripts are looked for: $LLAMA_CPP_SOURCE, else what `make llama-cpp-source` fetched
LLAMA_CPP_SOURCE = Path(os.environ.get("LLAMA_CPP_SOURCE")
                        or Path(__file__).resolve().parent.parent / ".cache" / "llama.cpp")


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here (None when it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama-cpp-python is not installed (make setup installs it from ../shared/wheels/ when the wheel is "
                "there; building it from source takes 20+ minutes)")
    return None


def converter_missing() -> str | None:
    """Why llama.cpp's convert_lora_to_gguf.py cannot run here (None when it can)."""
    if not (LLAMA_CPP_SOURCE / "convert_lora_to_gguf.py").is_file():
        return (f"llama.cpp's convert_lora_to_gguf.py is not at {LLAMA_CPP_SOURCE} (make llama-cpp-source fetches "
                "it; or set LLAMA_CPP_SOURCE to a llama.cpp checkout)")
    return None


def write_base_gguf(model: torch.nn.Module, path) -> None:
    """``model`` (a transformers causal LM of an architecture in ARCHITECTURES) as a float32 base GGUF."""
    import gguf

    config = model.config
    architecture = ARCHITECTURES[type(model).__name__]
    arch = architecture.name
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rope = getattr(config, "rope_parameters", None) or {}
    if arch != "gemma":
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if arch in ("llama", "phi3"):
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch == "phi3":
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length",
                          getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        writer.add_sliding_window(config.sliding_window or 0)
    writer.add_tokenizer_model("none")
    names = gguf.get_tensor_name_map({n: k for k, n in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, _, parameter = name.rpartition(".")
        if module == "lm_head" and config.tie_word_embeddings:
            continue
        mapped = names.get_name(module)
        assert mapped is not None, name
        data = tensor.detach().float().numpy()
        kind = mapped.rpartition(".")[2]
        if architecture.permutes_qk and kind in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
            data = permute(data.reshape(data.shape[0], -1), heads).reshape(data.shape)
        if arch == "gemma" and kind.endswith("norm"):
            data = data + 1
        writer.add_tensor(f"{mapped}.{parameter}", np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_EVAL = """
import json, sys
import numpy as np
from llama_cpp import Llama
jobs = json.loads(sys.argv[1])
for job in jobs:
    model = Llama(model_path=job["base"], lora_path=job["lora"], logits_all=True, type_k=0, type_v=0, n_ctx=64,
                  n_batch=64, n_threads=2, seed=0, verbose=False)
    model.eval(job["ids"])
    np.save(job["out"], np.array(model.scores[: len(job["ids"])], dtype=np.float32))
    model.close()
"""


def llama_cpp_logits(jobs: list[tuple], folder) -> list[np.ndarray]:
    """Logits [tokens, vocab] of llama.cpp (float32 KV cache) for each ``(base gguf, lora gguf or None, ids)``, in one
    child process."""
    folder = Path(folder)
    spec = [{"base": os.fspath(base), "lora": None if lora is None else os.fspath(lora), "ids": list(map(int, ids)),
             "out": os.fspath(folder / f"llama_cpp_logits_{i}.npy")} for i, (base, lora, ids) in enumerate(jobs)]
    result = subprocess.run([sys.executable, "-c", _EVAL, json.dumps(spec)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [np.load(job["out"]) for job in spec]


def convert_lora_to_gguf(peft_folder, base_folder, out) -> subprocess.CompletedProcess:
    """llama.cpp's own converter (PEFT folder -> GGUF LoRA, float32)."""
    return subprocess.run([sys.executable, os.fspath(LLAMA_CPP_SOURCE / "convert_lora_to_gguf.py"), "--base",
                           os.fspath(base_folder), "--outfile", os.fspath(out), "--outtype", "f32",
                           os.fspath(peft_folder)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
