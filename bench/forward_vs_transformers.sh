#!/usr/bin/env bash
# Forward tokens/s and peak RSS, Tessera against transformers on the same checkpoint,
# ids, batch, length and threads, side by side:
#   bash bench/forward_vs_transformers.sh [iterations] [batch] [length]
# Each decoder and T5 runs twice: "logits" (the head's output at every position) and
# "loss" (the language-model loss of the ids, as evaluation computes perplexity; both
# sides print the loss, and the table shows their difference).
# Checkpoints: the real all-MiniLM-L6-v2 and SmolLM2-135M-Instruct, and real architectures
# at real sizes with random weights (bench/make_checkpoints.py): GPT-2 small, a LLaMA with
# grouped-query attention (~110 M) and T5-small.
# TESSERA_BENCH_DEVICE=cuda runs both sides on the GPU and adds their peak GPU memory
# (bench/device_check.sh does so on a machine with a GPU, with binaries built beforehand:
# TESSERA_BENCH_PREBUILT=1 and the TESSERA_* directories already in the environment).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
iters=${1:-5} batch=${2:-8} len=${3:-128} threads=$(nproc) device=${TESSERA_BENCH_DEVICE:-cpu}
if [ -z "${TESSERA_BENCH_PREBUILT:-}" ]; then
  bash "$root/scripts/build" >/dev/null
  source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
  cmake --build "$root/build" --target tessera_bench_forward >/dev/null  # not part of the default build
fi
[ "$device" = cpu ] || export TESSERA_BENCH_GPU=1
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py "$root/bench/make_checkpoints.py" "$work"
printf "%-20s %14s %14s %8s %12s %12s %8s %10s" model "peer tok/s" "tessera tok/s" ratio "peer MiB" "tessera MiB" ratio "|Δ loss|"
if [ "$device" = cpu ]; then echo; else printf " %13s %12s %8s\n" "peer GPU MiB" "tessera GPU" ratio; fi
for run in "$TESSERA_MODEL_DIR logits" "$TESSERA_DECODER_DIR logits" "$TESSERA_DECODER_DIR loss" "$work/gpt2-small logits" "$work/gpt2-small loss" "$work/llama-110m logits" \
           "$work/llama-110m loss" "$work/t5-small logits" "$work/t5-small loss"; do
  set -- $run
  m=$1 mode=$2
  $py "$root/bench/measure.py" $py "$root/bench/peer_forward.py" "$m" $batch $len $iters $threads $mode $device >"$work/peer.json" 2>"$work/peer.err" \
    || { cat "$work/peer.err"; exit 1; }
  $py "$root/bench/measure.py" "$root/build/bin/tessera_bench_forward" "$m" $batch $len $iters $threads $mode $device >"$work/ours.json" 2>"$work/ours.err" \
    || { cat "$work/ours.err"; exit 1; }
  $py - "$work" "$(basename "$m") $mode" <<'PY'
import json, sys, pathlib
w, name = pathlib.Path(sys.argv[1]), sys.argv[2]
last = lambda p: json.loads([l for l in p.read_text().splitlines() if l.startswith("{")][-1])
p, o = last(w / "peer.json"), last(w / "ours.json")
peer, ours = p["tokens_per_s"], o["tokens_per_s"]
prss, orss = last(w / "peer.err")["peak_rss_mib"], last(w / "ours.err")["peak_rss_mib"]
diff = f"{abs(p['loss'] - o['loss']):10.1e}" if "loss" in p else f"{'':10}"
row = f"{name:20} {peer:14.0f} {ours:14.0f} {ours / peer:7.2f}x {prss:12.0f} {orss:12.0f} {orss / prss:8.2f} {diff}"
pg, og = last(w / "peer.err").get("peak_gpu_mib"), last(w / "ours.err").get("peak_gpu_mib")
print(row + (f" {pg:13.0f} {og:12.0f} {og / pg:8.2f}" if pg else ""))
PY
done
echo "(batch $batch, length $len, $iters timed iterations after 2 warm-up, $threads threads, f32, no padding, $device)"
