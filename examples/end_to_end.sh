#!/usr/bin/env bash
# The whole adapterkit job on the built-in tiny example, offline, as a user types it:
#   example data → train (LoRA ×2, prefix, BitFit) → inspect/validate → compose → merge/unmerge → ONNX export → ONNX Runtime.
# Usage: bash examples/end_to_end.sh [OUTPUT_DIR]      (make demo runs it into demo-output/)
set -euo pipefail
OUT=${1:-demo-output}
rm -rf "$OUT" && mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "1. A tiny Llama and BERT (random, with tokenizers) and JSONL data, built offline" \
  adapterkit example -o "$OUT/example"
BASE="$OUT/example/llama"

step "2a. Train a LoRA on formal support replies" \
  adapterkit train "$BASE" --method lora --data "$OUT/example/support_formal.jsonl" --steps 60 --rank 4 --alpha 8 -o "$OUT/formal.safetensors"
step "2b. Train a LoRA on casual replies (another rank)" \
  adapterkit train "$BASE" --method lora --data "$OUT/example/support_casual.jsonl" --steps 60 --rank 8 --alpha 8 -o "$OUT/casual.safetensors"
step "2c. Train a prefix (8 virtual tokens per layer)" \
  adapterkit train "$BASE" --method prefix --data "$OUT/example/support_formal.jsonl" --steps 40 --prefix-length 8 -o "$OUT/prefix.safetensors"
step "2d. Train BitFit and a classification head on the BERT sentiment set" \
  adapterkit train "$OUT/example/bert" --method bitfit --task classify --data "$OUT/example/sentiment_train.jsonl" \
    --eval-data "$OUT/example/sentiment_eval.jsonl" --epochs 3 -o "$OUT/sentiment.safetensors"

step "3. What is in a file, and is every file valid?" \
  adapterkit inspect "$OUT/formal.safetensors"
step "" adapterkit validate "$OUT"/*.safetensors
step "" adapterkit evaluate "$OUT/example/bert" "$OUT/sentiment.safetensors" --task classify --data "$OUT/example/sentiment_eval.jsonl"

step "4a. Compose: exact weighted sum of the two LoRAs (rank 4 + 8 = 12)" \
  adapterkit compose "$OUT/formal.safetensors" "$OUT/casual.safetensors" --weights 0.7,0.3 -o "$OUT/mix.safetensors"
step "4b. The same, compressed to rank 4 without forming ΔW (error printed and recorded)" \
  adapterkit compose "$OUT/formal.safetensors" "$OUT/casual.safetensors" --weights 0.7,0.3 --method svd --rank 4 -o "$OUT/mix_r4.safetensors"
step "4c. LoRA and prefix in one file" \
  adapterkit compose "$OUT/mix.safetensors" "$OUT/prefix.safetensors" -o "$OUT/mix_prefix.safetensors"
step "" adapterkit inspect "$OUT/mix_prefix.safetensors"

step "5a. Merge the mix into the base weights, streamed tensor by tensor" \
  adapterkit merge "$BASE" "$OUT/mix.safetensors" -o "$OUT/merged"
step "5b. ...and take it out again" \
  adapterkit unmerge "$OUT/merged" "$OUT/mix.safetensors" -o "$OUT/unmerged"

step "6a. Export the merged model to ONNX and check ONNX Runtime against torch" \
  adapterkit export --onnx "$BASE" "$OUT/mix.safetensors" --merged -o "$OUT/onnx_merged" --verify
step "6b. Export one graph with swappable adapters (LoRA mix, formal LoRA, prefix), verified per adapter" \
  adapterkit export --onnx "$BASE" "$OUT/mix.safetensors" "$OUT/formal.safetensors" "$OUT/prefix.safetensors" --unmerged -o "$OUT/onnx_unmerged" --verify

step "7. Serve: one ONNX Runtime session, adapters switched per call" \
  python - "$OUT/onnx_unmerged" "$BASE" <<'PY'
import sys
import numpy as np
from transformers import AutoTokenizer
from adapterkit.onnx.runner import Runner

runner = Runner(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
batch = tokenizer(["dear customer , thank you"], return_tensors="np")
inputs = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
print(f"provider: {runner.provider}")
for adapter in [None, *runner.adapters]:
    logits = runner.run(inputs, adapter=adapter)["logits"]
    next_token = tokenizer.decode([int(logits[0, -1].argmax())])
    print(f"adapter {adapter or '(none: base)':<12} next token after the prompt: {next_token!r}")
PY

printf '\n\033[1mDone.\033[0m Everything is in %s/\n' "$OUT"
