#!/usr/bin/env bash
# Greedy generation, new tokens/s and peak RSS, Tessera (`generate`, the code behind
# `tessera generate`) against transformers' `generate` on the same checkpoint, random
# prompt ids, batch, lengths and threads, side by side; both with a key/value cache and no
# EOS to stop a row:
#   bash bench/generate_vs_transformers.sh [iterations] [prompt length] [new tokens]
# Checkpoints: the real SmolLM2-135M-Instruct (batch 1 and 8), and GPT-2 small, a LLaMA
# with grouped-query attention (~110 M) and T5-small with random weights
# (bench/make_checkpoints.py). "equal" counts the leading new tokens of the first row that
# both sides chose alike (greedy: all of them, unless two logits tie within rounding).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
iters=${1:-3} len=${2:-32} new=${3:-64} threads=$(nproc)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
cmake --build "$root/build" --target tessera_bench_generate >/dev/null  # not part of the default build
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py "$root/bench/make_checkpoints.py" "$work"
printf "%-28s %14s %14s %8s %12s %12s %8s %8s\n" model "peer tok/s" "tessera tok/s" ratio "peer MiB" "tessera MiB" ratio equal
for run in "$TESSERA_DECODER_DIR 1" "$TESSERA_DECODER_DIR 8" "$work/gpt2-small 1" "$work/llama-110m 1" "$work/t5-small 1"; do
  set -- $run
  m=$1 batch=$2
  $py "$root/bench/measure.py" $py "$root/bench/peer_generate.py" "$m" $batch $len $new $iters $threads >"$work/peer.json" 2>"$work/peer.err" \
    || { cat "$work/peer.err"; exit 1; }
  $py "$root/bench/measure.py" "$root/build/bin/tessera_bench_generate" "$m" $batch $len $new $iters $threads >"$work/ours.json" 2>"$work/ours.err" \
    || { cat "$work/ours.err"; exit 1; }
  $py "$root/bench/generate_row.py" "$work" "$(basename "$m") batch $batch"
done
echo "(prompt $len tokens, $new new tokens, $iters timed runs after 1 warm-up, $threads threads, f32, greedy, cpu)"
