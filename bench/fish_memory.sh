#!/usr/bin/env bash
# What a sparse method costs: peak RSS of causal-LM training on the real SmolLM2-135M with a
# FISH mask keeping 0.5% of the weights (a sparse delta: its values, gradients and Adam
# moments are that 0.5%), with LoRA r = 8 on every projection at the same batch, and with
# full fine-tuning of every weight by transformers on the same torch (AdamW); and the sizes
# of the adapter folders the two Tessera runs write.
#   bash bench/fish_memory.sh [steps] [batch] [max_length] [fisher samples]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
steps=${1:-10} batch=${2:-8} len=${3:-64} samples=${4:-64} threads=$(nproc)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
config() {  # method block -> a Tessera config on SmolLM2
  cat <<TOML
[model]
path = "$TESSERA_DECODER_DIR"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
max_length = $len
test_fraction = 0.02
[task]
kind = "causal-lm"
[train]
epochs = 1
batch_size = $batch
eval_batch_size = $batch
threads = $threads
max_steps = $steps
shuffle = false
lr = 1e-4
$1
TOML
}
config $'[[methods]]\nplugin = "fish_mask"\n[methods.params]\nkeep_ratio = 0.005\nnum_samples = '"$samples" >"$work/fish.toml"
config $'[[methods]]\nplugin = "lora"\ntargets = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]\n[methods.params]\nr = 8' >"$work/lora.toml"
printf "%-40s %12s %14s\n" run "peak RSS MiB" "adapter MiB"
for m in fish lora; do
  $py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$work/$m.toml" --run-dir "$work/$m" >/dev/null 2>"$work/$m.err" \
    || { cat "$work/$m.err"; exit 1; }
  rss=$($py -c 'import json,sys; print(json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])["peak_rss_mib"])' "$work/$m.err")
  size=$(du -sk "$work/$m/adapter" | cut -f1)
  printf "%-40s %12.0f %14.2f\n" "tessera $m" "$rss" "$(echo "$size / 1024" | bc -l)"
done
$py "$root/bench/measure.py" $py "$root/bench/peer_lm_peft.py" --full --model "$TESSERA_DECODER_DIR" --data "$TESSERA_DATA_DIR/polarity.csv" \
  --steps "$steps" --warmup-steps 0 --batch-size $batch --max-length $len --threads "$threads" >/dev/null 2>"$work/full.err" || { cat "$work/full.err"; exit 1; }
rss=$($py -c 'import json,sys; print(json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])["peak_rss_mib"])' "$work/full.err")
printf "%-40s %12.0f %14s\n" "transformers full fine-tuning (AdamW)" "$rss" "(the model)"
echo "(SmolLM2-135M-Instruct, batch $batch, length ≤ $len, $steps steps, FISH keep 0.5% from $samples examples, $threads threads, f32, cpu)"
