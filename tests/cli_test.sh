#!/usr/bin/env bash
# End-to-end checks of the ctxcache CLI: exit codes and messages on bad input (corrupt or
# missing model files, bad flags, bad sampling values), tokenize on a vocabulary-only GGUF,
# and a short greedy generation with the real model.
# Usage: cli_test.sh BUILD_BIN SOURCE_DIR
set -uo pipefail
bin="$1"
src="$2"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
pass=0

expect() {  # expect NAME WANT_RC WANT_SUBSTRING -- command...
  local name="$1" want_rc="$2" want="$3"
  shift 4
  local out rc
  out="$("$@" 2>&1)"
  rc=$?
  if [[ "$rc" != "$want_rc" ]] || [[ "$out" != *"$want"* ]]; then
    echo "FAIL $name: rc=$rc (want $want_rc), output: ${out:0:400}"
    fail=$((fail + 1))
  else
    echo "ok   $name"
    pass=$((pass + 1))
  fi
}

printf 'GGML\x03\x00\x00\x00' > "$tmp/bad_magic.gguf"
printf 'GGUF\x03\x00\x00\x00\x00\x00' > "$tmp/truncated.gguf"
# v3 header claiming 2^62 tensors and 0 metadata keys
printf 'GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\x00\x00\x00' > "$tmp/huge.gguf"
: > "$tmp/empty.gguf"

expect bad_magic 1 "bad magic" -- "$bin" info --model "$tmp/bad_magic.gguf"
expect truncated 1 "truncated" -- "$bin" info --model "$tmp/truncated.gguf"
expect huge_tensor_count 1 "tensors" -- "$bin" info --model "$tmp/huge.gguf"
expect empty_file 1 "truncated" -- "$bin" generate --model "$tmp/empty.gguf" --prompt hi
expect missing_file 1 "cannot open" -- "$bin" info --model "$tmp/nope.gguf"
expect directory 1 "not a regular file" -- "$bin" info --model "$tmp"
expect unknown_flag 2 "unknown flag --bogus" -- "$bin" info --bogus 1
expect unknown_command 1 "unknown command" -- "$bin" frobnicate
expect no_args 2 "usage" -- "$bin"
expect vocab_only_tokenize 0 "15496" -- "$bin" tokenize --model "$src/tests/data/tokenizer/suite/ggml-vocab-gpt-2.gguf" --ids-only "Hello world"
expect vocab_only_generate 1 "is not supported" -- "$bin" generate --model "$src/tests/data/tokenizer/suite/ggml-vocab-gpt-2.gguf" --prompt hi

model="$("$src/tools/fetch_model.sh" smollm2 2>/dev/null || true)"
if [[ -s "$model" ]]; then
  expect bad_temperature 1 "temperature" -- "$bin" generate --model "$model" --prompt hi --temperature -1
  expect bad_top_p 1 "top_p" -- "$bin" generate --model "$model" --prompt hi --top-p 0
  expect not_a_number 1 "not a number" -- "$bin" generate --model "$model" --prompt hi --max-tokens lots
  expect greedy_generate 0 "Paris" -- "$bin" generate --model "$model" --prompt "The capital of France is" --temperature 0 --max-tokens 8 --quiet
  expect chat_generate 0 "" -- "$bin" generate --model "$model" --chat --prompt "Say hi" --max-tokens 4 --quiet
  expect info_real 0 "fingerprint" -- "$bin" info --model "$model"
  # Compress once, answer from the compressed context (a needle in 1K tokens of filler).
  for i in $(seq 1 120); do
    case $((i % 4)) in 0) s="The grass is green." ;; 1) s="The sky is blue." ;;
      2) s="Here we go." ;; *) s="There and back again." ;; esac
    [[ $i == 70 ]] && s="The secret code is 4729."
    printf '%s ' "$s"
  done > "$tmp/doc.txt"
  expect compress_snapkv 0 "kept per head" -- "$bin" compress --model "$model" --doc "$tmp/doc.txt" \
    --method snapkv --ratio 8 --question "What is the secret code?" --out "$tmp/doc.ctx" --quiet
  expect generate_from_context 0 "4729" -- "$bin" generate --model "$model" --context "$tmp/doc.ctx" \
    --prompt " Question: What is the secret code? Answer: The secret code is" --temperature 0 \
    --max-tokens 6 --quiet
  # Ada-KV head budgets: the heads keep different numbers of entries, stored and answered from.
  expect compress_adaptive 0 "head_budget=adaptive" -- "$bin" compress --model "$model" \
    --doc "$tmp/doc.txt" --method snapkv --ratio 8 --head-budget adaptive \
    --question "What is the secret code?" --out "$tmp/ada.ctx"
  expect generate_from_adaptive 0 "4729" -- "$bin" generate --model "$model" --context "$tmp/ada.ctx" \
    --prompt " Question: What is the secret code? Answer: The secret code is" --temperature 0 \
    --max-tokens 6 --quiet
  expect bad_head_budget 1 "head_budget must be \"uniform\"" -- "$bin" compress --model "$model" \
    --doc "$tmp/doc.txt" --method snapkv --ratio 8 --head-budget ada --out "$tmp/x.ctx"
  expect adaptive_streaming 1 "scores by position" -- "$bin" compress --model "$model" \
    --doc "$tmp/doc.txt" --method streaming --ratio 8 --head-budget adaptive --out "$tmp/x.ctx"
  # Prefill once (method none keeps everything), select per query: 4x fewer entries for this
  # request, the answer still found, the per-request bytes reported.
  expect compress_none 0 "1.0x compression" -- "$bin" compress --model "$model" --doc "$tmp/doc.txt" \
    --method none --out "$tmp/full.ctx"
  expect select_per_query 0 "4729" -- "$bin" generate --model "$model" --context "$tmp/full.ctx" \
    --select-ratio 4 --prompt " Question: What is the secret code? Answer: The secret code is" \
    --temperature 0 --max-tokens 6
  expect select_reports_bytes 0 "MB attended, selected for this prompt at 4x" -- "$bin" generate --model "$model" \
    --context "$tmp/full.ctx" --select-ratio 4 --prompt " Question: What is the secret code?" \
    --max-tokens 1
  expect select_ratio_one 1 "must be > 1" -- "$bin" generate --model "$model" --context "$tmp/full.ctx" \
    --select-ratio 1 --prompt hi
  expect select_needs_whole 1 "stored whole" -- "$bin" generate --model "$model" --context "$tmp/doc.ctx" \
    --select-ratio 4 --prompt hi
  expect unknown_kv_dtype 1 "unknown kv_dtype \"int3\"" -- "$bin" compress --model "$model" \
    --doc "$tmp/doc.txt" --method snapkv --ratio 8 --kv-dtype int3 --out "$tmp/x.ctx"
  expect compress_int4 0 "stored as int4" -- "$bin" compress --model "$model" --doc "$tmp/doc.txt" \
    --method snapkv --ratio 8 --kv-dtype int4 --question "What is the secret code?" \
    --out "$tmp/doc4.ctx" --quiet
  expect generate_from_int4 0 "4729" -- "$bin" generate --model "$model" --context "$tmp/doc4.ctx" \
    --prompt " Question: What is the secret code? Answer: The secret code is" --temperature 0 \
    --max-tokens 6 --quiet
  # Digest form needs a compressor trained for the model: none given, or one of another width.
  expect digest_needs_compressor 1 "--digest-compressor" -- "$bin" compress --model "$model" \
    --doc "$tmp/doc.txt" --method digest --ratio 4 --out "$tmp/x.ctx"
  expect digest_other_width 1 "its width is 64" -- "$bin" compress --model "$model" \
    --doc "$tmp/doc.txt" --method digest --ratio 4 --out "$tmp/x.ctx" \
    --digest-compressor "$src/tests/data/digest/tiny_icformer.gguf"
  expect digest_int4 1 "leave kv_dtype at fp16" -- "$bin" compress --model "$model" \
    --doc "$tmp/doc.txt" --method digest --ratio 4 --kv-dtype int4 --out "$tmp/x.ctx"
  head -c 100 "$tmp/doc.ctx" > "$tmp/trunc.ctx"
  expect truncated_context 1 "truncated" -- "$bin" generate --model "$model" --context "$tmp/trunc.ctx" --prompt hi
  expect missing_context 1 "cannot open" -- "$bin" generate --model "$model" --context "$tmp/none.ctx" --prompt hi
  expect unknown_method 1 "unknown compression method" -- "$bin" compress --model "$model" --doc "$tmp/doc.txt" --method bogus --ratio 8 --out "$tmp/x.ctx"
  expect bad_ratio 1 "ratio must be > 1" -- "$bin" compress --model "$model" --doc "$tmp/doc.txt" --method finch --ratio 1 --out "$tmp/x.ctx"
  expect bad_budget 1 "" -- "$bin" compress --model "$model" --doc "$tmp/doc.txt" --method snapkv --budget 0 --out "$tmp/x.ctx"
  expect bench_compare_decode 0 "median of 2 pairs" -- "$bin" bench --model "$model" --n-prompt 64 \
    --n-gen 4 --threads 1 --compare-decode --repeat 2 --stride 2 --topk 8
  expect bench_compare_needs_gen 1 "needs --n-gen >= 1" -- "$bin" bench --model "$model" \
    --n-prompt 64 --n-gen 0 --compare-decode
  : > "$tmp/empty.txt"
  expect empty_doc 1 "empty" -- "$bin" compress --model "$model" --doc "$tmp/empty.txt" --method streaming --ratio 4 --out "$tmp/x.ctx"
  [[ ! -e "$tmp/x.ctx" ]] || { echo "FAIL a failed compress left $tmp/x.ctx behind"; fail=$((fail + 1)); }
else
  echo "skip model checks: test model not fetched (tools/fetch_model.sh smollm2)"
fi

# The served default, found with no flags: Qwen2.5-Coder-0.5B, a model that answers a question
# about a document from the document -- in full, and from a context kept at 8x.
qwen="$src/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
if [[ -s "$qwen" ]]; then
  noflags=(env -u CTXCACHE_MODEL -C "$src" "$bin")
  expect default_is_qwen 0 "qwen2" -- "${noflags[@]}" info
  people=("Eleanor Whitcombe:Ashford" "Thomas Pembury:Larkhill" "Margaret Onslow:Dunmere")
  for i in $(seq 1 60); do
    case $((i % 5)) in
      0) s="The morning was grey, and the road to the village was muddy after the rain." ;;
      1) s="Nobody in the house could remember a winter as long as that one had been." ;;
      2) s="The letters arrived on Tuesdays, carried up the hill by a boy on a pony." ;;
      3) s="Dinner was served late, and the conversation turned to the price of corn." ;;
      *) s="In the evenings the family read aloud by the fire until the candles ran low." ;;
    esac
    if ((i % 20 == 10)); then
      p="${people[$((i / 20))]}"
      s="$s ${p%%:*} was born in the town of ${p##*:}."
    fi
    printf '%s ' "$s"
  done > "$tmp/facts.txt"
  ask=" Question: In which town was Thomas Pembury born? Answer:"
  expect qwen_compress_full 0 "1.0x compression" -- "${noflags[@]}" compress --doc "$tmp/facts.txt" \
    --method none --out "$tmp/facts_full.ctx"
  expect qwen_answers_full 0 "Larkhill" -- "${noflags[@]}" generate --context "$tmp/facts_full.ctx" \
    --prompt "$ask" --temperature 0 --max-tokens 8 --quiet
  expect qwen_compress_snapkv 0 "kept per head" -- "${noflags[@]}" compress --doc "$tmp/facts.txt" \
    --method snapkv --ratio 8 --question "In which town was Thomas Pembury born?" \
    --out "$tmp/facts_8x.ctx" --quiet
  expect qwen_answers_8x 0 "Larkhill" -- "${noflags[@]}" generate --context "$tmp/facts_8x.ctx" \
    --prompt "$ask" --temperature 0 --max-tokens 8 --quiet
  # Digest form with the compressor shipped for this model: a context file of digest vectors,
  # read by the model before the prompt (what it answers is measured in docs/quality.md, not
  # asserted here: a compressor trained for a few CPU-hours may not know the answer).
  compressor="$src/train/compressors/qwen2.5-coder-0.5b-instruct-q4_k_m.icformer.gguf"
  expect qwen_compress_digest 0 "digest" -- "${noflags[@]}" compress --doc "$tmp/facts.txt" \
    --method digest --ratio 4 --digest-compressor "$compressor" --out "$tmp/facts_digest.ctx"
  expect qwen_generate_digest 0 "" -- "${noflags[@]}" generate --context "$tmp/facts_digest.ctx" \
    --context "$tmp/facts_8x.ctx" --prompt "$ask" --temperature 0 --max-tokens 4 --quiet
elif [[ "${CTXCACHE_REQUIRE_MODEL:-}" == 1 ]]; then
  echo "FAIL the default model $qwen is missing (tools/fetch_model.sh)"; fail=$((fail + 1))
else
  echo "skip default-model checks: $qwen not fetched (tools/fetch_model.sh)"
fi
echo "$pass passed, $fail failed"
[[ $fail -eq 0 ]]
