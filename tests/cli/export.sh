#!/usr/bin/env bash
# `tessera export`: a LoRA run (over a dense base and over one kept as int8) and a BitFit run on the real MiniLM, each written as a Hugging
# Face model directory that transformers loads and that computes what peft's merged model
# (LoRA) or the base with the run's saved biases (BitFit) computes (export_check.py). A run
# whose method cannot fold is refused, naming it; an existing OUT_DIR needs --overwrite;
# an error leaves no OUT_DIR and no half-written sibling.
set -euo pipefail
tessera=$1 out=$2 python=$3
check=$(dirname "${BASH_SOURCE[0]}")/export_check.py
rm -rf "$out" && mkdir -p "$out"

# run NAME PLUGIN [PARAMS…]: a 3-step run at lr 1e-2 (enough to move LoRA's B off zero).
run() {
  local name=$1 plugin=$2
  shift 2
  {
    printf '[model]\npath = "${TESSERA_MODEL_DIR}"\n[data]\npath = "${TESSERA_DATA_DIR}/polarity.csv"\nlimit = 200\nmax_length = 32\n'
    printf '[train]\nepochs = 1\nbatch_size = 16\nmax_steps = 3\nlr = 1e-2\nwarmup_ratio = 0\n'
    printf '[[methods]]\nplugin = "%s"\n' "$plugin"
    printf '%s\n' "$@"
  } >"$out/$name.toml"
  "$tessera" --log-level warn train "$out/$name.toml" --run-dir "$out/$name" >/dev/null
}
# fails NAME ARGS…: the command exits 1 with one line on stderr, kept in $out/NAME.err.
fails() {
  local name=$1 rc=0
  shift
  "$@" >/dev/null 2>"$out/$name.err" || rc=$?
  cat "$out/$name.err"
  [ "$rc" -eq 1 ] && [ "$(wc -l <"$out/$name.err")" -eq 1 ]
}

run lora lora 'targets = ["attn.q", "attn.v"]' '[methods.params]' 'r = 4'
run bitfit bitfit
"$tessera" export "$out/lora" "$out/lora-hf" | tee "$out/lora.txt"
grep -Eq "^exported $out/lora-hf: 104 tensors, 12 changed by the merge, [0-9.]+ MB$" "$out/lora.txt"
grep -q "the task head (sequence-classification) is no part of a Hugging Face base model: it stays in $out/lora/adapter/head.safetensors, not exported" "$out/lora.txt"
"$tessera" export "$out/bitfit" "$out/bitfit-hf" --threads 1 | tee "$out/bitfit.txt"
grep -Eq "^exported $out/bitfit-hf: 104 tensors, [1-9][0-9]* changed by the merge, [0-9.]+ MB$" "$out/bitfit.txt"
# config.json and the tokenizer's files come along; the base's weight files do not, nor does the head.
for f in config.json model.safetensors tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do [ -f "$out/lora-hf/$f" ]; done
[ "$(ls "$out/lora-hf" | wc -l)" -eq 6 ] && [ ! -e "$out/lora-hf.partial" ]
"$python" "$check" lora "$TESSERA_MODEL_DIR" "$out/lora/adapter/lora" "$out/lora-hf"
"$python" "$check" bitfit "$TESSERA_MODEL_DIR" "$out/bitfit/adapter/bitfit" "$out/bitfit-hf"

# Over a base kept quantized (int8 rows), the export dequantizes, merges into that, and says so.
sed 's|^\[model\]|[model]\nquantize = "int8"|' "$out/lora.toml" >"$out/lora8.toml"
"$tessera" --log-level warn train "$out/lora8.toml" --run-dir "$out/lora8" >/dev/null
"$tessera" export "$out/lora8" "$out/lora8-hf" | tee "$out/lora8.txt"
grep -q 'the base was loaded quantized (\[model\] quantize = "int8"): its weights are written dequantized' "$out/lora8.txt"
grep -Eq "^exported $out/lora8-hf: 104 tensors, 36 changed by the merge or the dequantization, [0-9.]+ MB$" "$out/lora8.txt"
"$python" "$check" int8lora "$TESSERA_MODEL_DIR" "$out/lora8/adapter/lora" "$out/lora8-hf"

# --dtype stores another dtype and says so in config.json.
"$tessera" export "$out/lora" "$out/lora-bf16" --dtype bf16 >/dev/null
"$python" "$check" dtype "$out/lora-bf16" bfloat16

# An OUT_DIR that holds anything is refused without --overwrite, and left as it was.
fails exists "$tessera" export "$out/bitfit" "$out/lora-hf"
grep -q "lora-hf is not empty: pass --overwrite to replace it" "$out/exists.err"
"$python" "$check" lora "$TESSERA_MODEL_DIR" "$out/lora/adapter/lora" "$out/lora-hf"
"$tessera" export "$out/bitfit" "$out/lora-hf" --overwrite >/dev/null
"$python" "$check" bitfit "$TESSERA_MODEL_DIR" "$out/bitfit/adapter/bitfit" "$out/lora-hf"
# Nor may it replace what it reads.
fails replaces_run "$tessera" export "$out/lora" "$out" --overwrite
grep -q "would replace the run directory $out/lora that the export reads" "$out/replaces_run.err"

# A soft prompt cannot fold into the weights: refused, naming plugin and instance, nothing written.
run prompt prompt_tuning 'name = "soft"' '[methods.params]' 'num_virtual_tokens = 4'
fails prompt "$tessera" export "$out/prompt" "$out/prompt-hf"
grep -q "cannot export $out/prompt: plugin 'prompt_tuning' (instance 'soft') is not mergeable: its effect cannot be folded into the weights" "$out/prompt.err"
[ ! -e "$out/prompt-hf" ] && [ ! -e "$out/prompt-hf.partial" ]

# Not a run, and an OUT_DIR that cannot be written: one line each.
fails not_a_run "$tessera" export "$out" "$out/x-hf"
grep -q "is not a run directory of \`tessera train\`" "$out/not_a_run.err"
fails unwritable "$tessera" export "$out/lora" "$out/lora.toml/hf"
grep -q "cannot write $out/lora.toml/hf: $out/lora.toml is not a writable directory" "$out/unwritable.err"
echo "cli export: ok"
