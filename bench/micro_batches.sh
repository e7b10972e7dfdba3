#!/usr/bin/env bash
# Gradient accumulation ([train] micro_batches) on the real decoder: the README's SmolLM2 LoRA
# run (configs/smollm2-lora.toml: batch 8, length ≤ 64, one epoch) with each batch computed in
# 1 and in 4 pieces, and the QLoRA preset (configs/qlora-smollm2.toml) with its activations
# kept instead of recomputed, in 4 and in 8 pieces; one after the other on this machine.
# Prints each run's test perplexity, training examples/s, peak RSS and wall time, and the
# ratios to the f32 run in one piece.
#   bash bench/micro_batches.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run() {  # name config pieces [kept: the QLoRA preset's activations kept]
  sed -e "s|^dir = .*|dir = \"$work/$1\"|" -e "s|^\[train\]|[train]\nmicro_batches = $3|" "$2" >"$work/$1.toml"
  if [[ -n ${4:-} ]]; then sed -i 's|^gradient_checkpointing = true|gradient_checkpointing = false|' "$work/$1.toml"; fi
  local t0=$SECONDS
  $py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.rss"
  echo "$1 $((SECONDS - t0))" >>"$work/walls"
}
run f32 "$root/configs/smollm2-lora.toml" 1
run f32_4 "$root/configs/smollm2-lora.toml" 4
run qlora_kept_4 "$root/configs/qlora-smollm2.toml" 4 kept
run qlora_kept_8 "$root/configs/qlora-smollm2.toml" 8 kept
$py - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
walls = dict(l.split() for l in open(os.path.join(work, "walls")))
rss = lambda n: json.loads(open(os.path.join(work, n + ".rss")).read().strip().splitlines()[-1])["peak_rss_mib"]
print("| run | test perplexity | examples/s | peak RSS MiB | wall s | examples/s / f32 | RSS / f32 |")
print("|---|---:|---:|---:|---:|---:|---:|")
f = None
for n in ["f32", "f32_4", "qlora_kept_4", "qlora_kept_8"]:
    r = json.load(open(os.path.join(work, n, "result.json")))
    row = (r["test_perplexity"], r["examples_per_s"], rss(n), float(walls[n]))
    f = f or row
    print(f"| {n} | {row[0]:.3f} | {row[1]:.2f} | {row[2]:.0f} | {row[3]:.0f} | {row[1] / f[1]:.2f} | {row[2] / f[2]:.2f} |")
PY
