#!/usr/bin/env bash
# Greedy generation through a soft prompt, new tokens/s and peak RSS: Tessera (`generate`
# with the PEFT folder attached, as `tessera generate --peft` runs it) against peft +
# transformers' `generate` on the same folder, checkpoint (the real SmolLM2-135M-Instruct),
# random prompt ids, batch, lengths and threads, side by side; no EOS stops a row:
#   bash bench/prompt_generate_vs_peft.sh [prefix_tuning|prompt_tuning] [iterations] [prompt length] [new tokens]
# The folder: peft's own (get_peft_model + save_pretrained), 20 virtual tokens, at random.
# "equal" counts the leading new tokens of the first row both sides chose alike.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
method=${1:-prefix_tuning} iters=${2:-3} len=${3:-32} new=${4:-64} threads=$(nproc)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
cmake --build "$root/build" --target tessera_bench_generate >/dev/null  # not part of the default build
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py - "$TESSERA_DECODER_DIR" "$work/adapter" "$method" <<'PY'
import sys, torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM
model, out, method = sys.argv[1:4]
torch.manual_seed(0)
cfg = (PrefixTuningConfig if method == "prefix_tuning" else PromptTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=20)
m = get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), cfg)
with torch.no_grad():  # prefixes of the size a trained one has, not N(0, 1) keys
    for n, p in m.named_parameters():
        if "prompt_encoder" in n:
            p.mul_(0.1 if method == "prefix_tuning" else 0.02)
m.save_pretrained(out)
PY
printf "%-28s %14s %14s %8s %12s %12s %8s %8s\n" run "peer tok/s" "tessera tok/s" ratio "peer MiB" "tessera MiB" ratio equal
for batch in 1 8; do
  $py "$root/bench/measure.py" $py "$root/bench/peer_generate.py" "$TESSERA_DECODER_DIR" $batch $len $new $iters $threads "$work/adapter" \
    >"$work/peer.json" 2>"$work/peer.err" || { cat "$work/peer.err"; exit 1; }
  $py "$root/bench/measure.py" "$root/build/bin/tessera_bench_generate" "$TESSERA_DECODER_DIR" $batch $len $new $iters $threads "$work/adapter" \
    >"$work/ours.json" 2>"$work/ours.err" || { cat "$work/ours.err"; exit 1; }
  $py "$root/bench/generate_row.py" "$work" "$method batch $batch"
done
echo "(SmolLM2-135M-Instruct, 20 virtual tokens, prompt $len tokens, $new new tokens, $iters timed runs after 1 warm-up, $threads threads, f32, greedy, cpu)"
