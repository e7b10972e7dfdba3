#!/usr/bin/env bash
# QLoRA against LoRA on the real decoder: the README's SmolLM2 run (configs/smollm2-lora.toml:
# LoRA r 8 on all seven projections, 800 polarity sentences, 1 epoch of batch 8, 200 held
# out) three ways, one after the other on this machine —
#   f32    the converted f32 directory, dense weights (configs/smollm2-lora.toml);
#   qlora  the same directory, layers' weights as NF4 with double quantization and the layers'
#          activations recomputed in backward (configs/qlora-smollm2.toml);
#   qlora_kept  the same, activations kept (gradient_checkpointing = false);
#   f32_recomputed  the f32 run with gradient checkpointing;
#   gguf   the Q4_1 GGUF file itself, its own tokenizer, layers' weights kept as its blocks (configs/smollm2-gguf-lora.toml);
# then loading the model alone (one generated token) from the directory and from the GGUF:
# dense, the GGUF kept as its blocks (streamed: no dense copy is made), and NF4 from each.
# Prints each run's test perplexity, training examples/s, peak RSS and wall time, and the
# ratios to the f32 run.
#   bash bench/qlora_smollm2.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run() {  # name config [extra [model] line]
  sed -e "s|^dir = .*|dir = \"$work/$1\"|" "$2" >"$work/$1.toml"
  if [[ -n ${3:-} ]]; then sed -i "s|^\[model\]|[model]\n$3|" "$work/$1.toml"; fi
  local t0=$SECONDS
  $py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.rss"
  echo "$1 $((SECONDS - t0))" >>"$work/walls"
}
run f32 "$root/configs/smollm2-lora.toml"
run qlora "$root/configs/qlora-smollm2.toml"
sed 's|^gradient_checkpointing = true|gradient_checkpointing = false|' "$root/configs/qlora-smollm2.toml" >"$work/qlora_kept.src"
run qlora_kept "$work/qlora_kept.src"
sed 's|^\[train\]|[train]\ngradient_checkpointing = true|' "$root/configs/smollm2-lora.toml" >"$work/f32_recomputed.src"
run f32_recomputed "$work/f32_recomputed.src"
run gguf "$root/configs/smollm2-gguf-lora.toml"
load() {  # name model [generate's options]
  local t0 name=$1 model=$2
  shift 2
  t0=$(date +%s.%N)
  $py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn generate --model "$model" "$@" --max-new-tokens 1 "the film is" >/dev/null 2>"$work/$name.rss"
  echo "$name $(echo "$(date +%s.%N) - $t0" | bc)" >>"$work/loads"
}
load dir "$TESSERA_DECODER_DIR"
load gguf_file "$TESSERA_DECODER_GGUF"
load gguf_blocks "$TESSERA_DECODER_GGUF" --quantize gguf
load dir_nf4 "$TESSERA_DECODER_DIR" --quantize nf4
load gguf_nf4 "$TESSERA_DECODER_GGUF" --quantize nf4
$py - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
walls = dict(l.split() for l in open(os.path.join(work, "walls")))
loads = dict(l.split() for l in open(os.path.join(work, "loads")))
rss = lambda n: json.loads(open(os.path.join(work, n + ".rss")).read().strip().splitlines()[-1])["peak_rss_mib"]
rows = {}
for n in ["f32", "qlora", "qlora_kept", "f32_recomputed", "gguf"]:
    r = json.load(open(os.path.join(work, n, "result.json")))
    rows[n] = (r["test_perplexity"], r["examples_per_s"], rss(n), float(walls[n]))
print("| run | test perplexity | examples/s | peak RSS MiB | wall s | perplexity / f32 | examples/s / f32 | RSS / f32 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
f = rows["f32"]
for n, (p, e, m, w) in rows.items():
    print(f"| {n} | {p:.3f} | {e:.2f} | {m:.0f} | {w:.0f} | {p / f[0]:.3f} | {e / f[1]:.2f} | {m / f[2]:.2f} |")
print()
print("| load (one token generated) | wall s | peak RSS MiB |")
print("|---|---:|---:|")
for n in ["dir", "gguf_file", "gguf_blocks", "dir_nf4", "gguf_nf4"]:
    print(f"| {n} | {float(loads[n]):.2f} | {rss(n):.0f} |")
PY
