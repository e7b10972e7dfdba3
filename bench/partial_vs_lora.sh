#!/usr/bin/env bash
# The partial methods' training cost beside LoRA's, one after another in one run: examples/s
# (after the first three steps; a method's prepare(), such as a Fisher estimate, comes before
# and is not timed), peak RSS and the adapter folder's size, on the quickstart task
# (all-MiniLM-L6-v2, polarity, batch 32, every batch padded to length 64). No library ships
# these methods: LoRA (r = 8 on every projection, as bench/lora_vs_peft.sh) is the yardstick.
# DoRA (lora's use_dora) is here too, with and without dropout: with it, DoRA computes the
# base product of the dropped input a second time (PEFT's form); without, it does not.
#   bash bench/partial_vs_lora.sh [steps]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
steps=${1:-20} threads=$(nproc)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# name, then the method block
runs=(
  "lora" $'[[methods]]\nplugin = "lora"\ntargets = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]\n[methods.params]\nr = 8\nlora_alpha = 16\nlora_dropout = 0.1'
  "dora" $'[[methods]]\nplugin = "lora"\ntargets = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]\n[methods.params]\nr = 8\nlora_alpha = 16\nlora_dropout = 0.1\nuse_dora = true'
  "lora, no dropout" $'[[methods]]\nplugin = "lora"\ntargets = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]\n[methods.params]\nr = 8\nlora_alpha = 16'
  "dora, no dropout" $'[[methods]]\nplugin = "lora"\ntargets = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]\n[methods.params]\nr = 8\nlora_alpha = 16\nuse_dora = true'
  "bitfit" $'[[methods]]\nplugin = "bitfit"'
  "ln_tuning" $'[[methods]]\nplugin = "ln_tuning"'
  "fish_mask 0.5%" $'[[methods]]\nplugin = "fish_mask"\n[methods.params]\nnum_samples = 64'
  "child_tuning task-driven 30%" $'[[methods]]\nplugin = "child_tuning"\n[methods.params]\nfisher_batches = 8'
  "child_tuning task-free" $'[[methods]]\nplugin = "child_tuning"\n[methods.params]\nmode = "task_free"'
  "diff_pruning (both stages)" $'[[methods]]\nplugin = "diff_pruning"'
)
printf "%-30s %12s %14s %12s %10s %10s\n" method "examples/s" "peak RSS MiB" "adapter MiB" "speed/LoRA" "RSS/LoRA"
lora_speed="" lora_rss=""
for ((i = 0; i < ${#runs[@]}; i += 2)); do
  name=${runs[i]} block=${runs[i + 1]} toml="$work/$i.toml"
  cat >"$toml" <<TOML
[model]
path = "\${TESSERA_MODEL_DIR}"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
max_length = 64
padding = "max_length"
[train]
epochs = 1
batch_size = 32
lr = 1e-4
threads = $threads
max_steps = $((steps + 3))
shuffle = false
$block
TOML
  $py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$toml" --run-dir "$work/run$i" >/dev/null 2>"$work/$i.err" \
    || { cat "$work/$i.err"; exit 1; }
  rss=$($py -c 'import json,sys; print(json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])["peak_rss_mib"])' "$work/$i.err")
  speed=$($py -c 'import json,sys; print(json.load(open(sys.argv[1]))["examples_per_s"])' "$work/run$i/result.json")
  size=$(du -sk "$work/run$i/adapter" | cut -f1)
  [[ -z $lora_speed ]] && lora_speed=$speed lora_rss=$rss
  printf "%-30s %12.1f %14.0f %12.2f %10.2f %10.2f\n" "$name" "$speed" "$rss" "$(echo "$size / 1024" | bc -l)" \
    "$(echo "$speed / $lora_speed" | bc -l)" "$(echo "$rss / $lora_rss" | bc -l)"
done
echo "(all-MiniLM-L6-v2, batch 32, length 64, $steps steps, $threads threads, f32, cpu)"
