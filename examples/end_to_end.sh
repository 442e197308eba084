#!/usr/bin/env bash
# The whole adapterkit job on the built-in tiny example, offline, as a user types it:
#   example data → train (LoRA ×2, prefix, BitFit, DoRA, (IA)³, a bottleneck adapter, a classifier)
#   → inspect/validate → compose → merge/unmerge
#   → ONNX export → ONNX Runtime → push/pull through a Hub stand-in on loopback → PEFT conversion
#   → adapterkit serve (OpenAI API, mixed adapters in one batch, an adapter added from the Hub while serving).
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
  adapterkit train "$BASE" --method lora --data "$OUT/example/support_formal.jsonl" --steps 300 --lr 1e-2 --rank 4 --alpha 8 -o "$OUT/formal.safetensors"
step "2b. Train a LoRA on casual replies (another rank)" \
  adapterkit train "$BASE" --method lora --data "$OUT/example/support_casual.jsonl" --steps 300 --lr 1e-2 --rank 8 --alpha 8 -o "$OUT/casual.safetensors"
step "2c. Train a prefix (8 virtual tokens per layer)" \
  adapterkit train "$BASE" --method prefix --data "$OUT/example/support_formal.jsonl" --steps 300 --prefix-length 8 -o "$OUT/prefix.safetensors"
step "2d. Train BitFit (bias deltas only)" \
  adapterkit train "$BASE" --method bitfit --data "$OUT/example/support_formal.jsonl" --steps 300 --lr 1e-2 -o "$OUT/bitfit.safetensors"
step "2e. The rest of the taxonomy: DoRA (magnitude and direction), (IA)³ (rescaled keys, values, feed-forward)" \
  adapterkit train "$BASE" --method dora --data "$OUT/example/support_formal.jsonl" --steps 100 --lr 1e-2 --rank 4 --alpha 8 -o "$OUT/dora.safetensors"
step "" adapterkit train "$BASE" --method ia3 --data "$OUT/example/support_formal.jsonl" --steps 100 -o "$OUT/ia3.safetensors"
step "...and a bottleneck adapter after each feed-forward block (Pfeiffer's placement)" \
  adapterkit train "$BASE" --method adapter --data "$OUT/example/support_formal.jsonl" --steps 100 --lr 1e-2 --reduction-factor 4 -o "$OUT/bottleneck.safetensors"
step "2f. Train a LoRA and a new classification head on the BERT sentiment set, evaluated each epoch" \
  adapterkit train "$OUT/example/bert" --method lora --task classify --data "$OUT/example/sentiment_train.jsonl" \
    --eval-data "$OUT/example/sentiment_eval.jsonl" --epochs 4 --lr 5e-3 -o "$OUT/sentiment.safetensors"

step "3. What is in a file, and is every file valid?" \
  adapterkit inspect "$OUT/formal.safetensors"
step "" adapterkit validate "$OUT"/*.safetensors
step "" adapterkit evaluate "$OUT/example/bert" "$OUT/sentiment.safetensors" --task classify --data "$OUT/example/sentiment_eval.jsonl"

step "4a. Compose: exact weighted sum of the two LoRAs (rank 4 + 8 = 12)" \
  adapterkit compose "$OUT/formal.safetensors" "$OUT/casual.safetensors" --weights 0.7,0.3 -o "$OUT/mix.safetensors"
step "4b. The same, compressed to rank 4 without forming ΔW (error printed and recorded)" \
  adapterkit compose "$OUT/formal.safetensors" "$OUT/casual.safetensors" --weights 0.7,0.3 --method svd --rank 4 -o "$OUT/mix_r4.safetensors"
step "4c. LoRA, prefix and BitFit in one file" \
  adapterkit compose "$OUT/mix.safetensors" "$OUT/prefix.safetensors" "$OUT/bitfit.safetensors" -o "$OUT/all_kinds.safetensors"
step "" adapterkit inspect "$OUT/all_kinds.safetensors"

step "5a. Merge the mix into the base weights, streamed tensor by tensor" \
  adapterkit merge "$BASE" "$OUT/mix.safetensors" -o "$OUT/merged"
step "5b. ...and take it out again" \
  adapterkit unmerge "$OUT/merged" "$OUT/mix.safetensors" -o "$OUT/unmerged"
step "5c. DoRA and (IA)³ merge and unmerge too (DoRA's row norms are kept beside the merged weights)" \
  adapterkit merge "$BASE" "$OUT/dora.safetensors" "$OUT/ia3.safetensors" -o "$OUT/merged_dora_ia3"
step "" adapterkit unmerge "$OUT/merged_dora_ia3" "$OUT/dora.safetensors" "$OUT/ia3.safetensors" -o "$OUT/restored"
step "" adapterkit inspect "$OUT/merged"

step "6a. Export the merged model to ONNX and check ONNX Runtime against torch" \
  adapterkit export --onnx "$BASE" "$OUT/mix.safetensors" --merged -o "$OUT/onnx_merged" --verify
step "6b. Export one graph with swappable adapters (every kind), verified per adapter" \
  adapterkit export --onnx "$BASE" "$OUT/mix.safetensors" "$OUT/formal.safetensors" "$OUT/prefix.safetensors" \
    "$OUT/bitfit.safetensors" "$OUT/dora.safetensors" "$OUT/ia3.safetensors" "$OUT/bottleneck.safetensors" \
    --unmerged -o "$OUT/onnx_unmerged" --verify
step "" adapterkit inspect "$OUT/onnx_unmerged"

step "7. Serve: one ONNX Runtime session, adapters switched per call" \
  python - "$OUT/onnx_unmerged" "$BASE" <<'PY'
import sys
import numpy as np
from transformers import AutoTokenizer
from adapterkit.onnx.runner import Runner

runner = Runner(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
print(f"ONNX Runtime runs on: {runner.provider}")
for adapter in [None, *runner.adapters]:
    ids = tokenizer(["dear customer ,"], return_tensors="np")["input_ids"].astype(np.int64)
    for _ in range(10):  # greedy decoding, one full forward per token (the export has no KV cache)
        logits = runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)}, adapter=adapter)["logits"]
        ids = np.concatenate([ids, logits[:, -1:].argmax(-1)], axis=1)
    print(f"{adapter or '(base)':<8} {tokenizer.decode(ids[0], skip_special_tokens=True)}")
PY

step "7b. One graph, a different adapter on each row: an adapter bank with a key/value cache" \
  adapterkit export --onnx "$BASE" "$OUT/formal.safetensors" "$OUT/casual.safetensors" \
    "$OUT/prefix.safetensors" --unmerged --bank --cache -o "$OUT/onnx_bank" --verify
step "" python - "$OUT/onnx_bank" "$BASE" <<'PY'
import sys
from transformers import AutoTokenizer
from adapterkit.onnx.runner import Runner

runner = Runner(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
prompts = ["dear customer ,", "hey ! sorry about", "thank you for contacting us about your refund", "we will"]
rows = [*runner.adapters, None]
for prompt, adapter, tokens in zip(prompts, rows, runner.generate_batch(
        [tokenizer(p)["input_ids"] for p in prompts], rows, max_new_tokens=8)):  # one batch, one run per token
    print(f"{adapter or '(base)':<8} {prompt} | {tokenizer.decode(tokens, skip_special_tokens=True)}")
PY

# A stand-in for huggingface.co on loopback (the same server the tests use): the real Hub client talks to it.
python tests/hub_server.py --port 0 > "$OUT/hub.url" & HUB_PID=$!
trap 'kill $HUB_PID 2>/dev/null' EXIT
until [ -s "$OUT/hub.url" ]; do sleep 0.2; done
export HF_ENDPOINT=$(cat "$OUT/hub.url") HF_HUB_DISABLE_XET=1 HF_HOME="$OUT/hf-home" HF_TOKEN=demo-token
step "8a. Push the mix: adapter + model card + sha256 record (+ PEFT files) in one commit" \
  adapterkit push "$OUT/mix.safetensors" demo/support-mix --with-peft
step "8b. Pull it back, sha256 and format verified, and use an hf:// reference like a path" \
  adapterkit pull demo/support-mix -o "$OUT/pulled.safetensors"
step "" cmp "$OUT/mix.safetensors" "$OUT/pulled.safetensors"
step "" adapterkit inspect hf://demo/support-mix

step "9. Convert to PEFT's format and back" \
  adapterkit convert "$OUT/formal.safetensors" --to peft -o "$OUT/formal-peft"
step "" adapterkit convert "$OUT/formal-peft" --base "$BASE" -o "$OUT/formal-back.safetensors"

# adapterkit serve: the base and three adapters behind an OpenAI-compatible API, on loopback
adapterkit serve "$BASE" formal="$OUT/formal.safetensors" casual="$OUT/casual.safetensors" \
  prefix="$OUT/prefix.safetensors" --port 0 > "$OUT/serve.log" & SERVE_PID=$!
trap 'kill $HUB_PID $SERVE_PID 2>/dev/null' EXIT
until grep -q "^serving" "$OUT/serve.log" 2>/dev/null; do sleep 0.2; done
URL=$(sed -n 's/.* on \(http[^ ]*\) .*/\1/p' "$OUT/serve.log")
until curl -sf "$URL/health" > /dev/null; do sleep 0.2; done
complete() { curl -s -w '\n' "$URL/v1/completions" -H 'Content-Type: application/json' -d "$1"; }
post() { curl -s -w '\n' "$URL/v1/$1" -H 'Content-Type: application/json' -d "$2"; }
together() {  # one request per adapter, all at once
  local clients=()
  for m in formal casual prefix; do
    complete "{\"model\": \"$m\", \"prompt\": \"dear customer ,\", \"max_tokens\": 8, \"temperature\": 0}" &
    clients+=($!)
  done
  wait "${clients[@]}"
}
step "10a. Serve the base and three adapters: which models are there?" curl -s -w '\n' "$URL/v1/models"
step "10b. Three requests on three adapters at once, generated in one batch" together
step "10c. Streamed (server-sent events)" \
  complete '{"model": "casual", "prompt": "hey !", "max_tokens": 3, "temperature": 0, "stream": true}'
step "10d. Add an adapter from the Hub while serving, use it, remove another" \
  post load_lora_adapter '{"lora_name": "mix", "lora_path": "hf://demo/support-mix"}'
step "" complete '{"model": "mix", "prompt": "dear customer ,", "max_tokens": 8, "temperature": 0}'
step "" post unload_lora_adapter '{"lora_name": "casual"}'
step "10e. A bad request gets a 4xx and one line; the server goes on" \
  complete '{"model": "casual", "prompt": "hey !"}'
step "" curl -s -w '\n' "$URL/health"
kill -TERM $SERVE_PID
wait $SERVE_PID || [ $? -eq 143 ]  # stopped by SIGTERM after the requests under way: 143, as every command

printf '\n\033[1mDone.\033[0m Everything is in %s/\n' "$OUT"
