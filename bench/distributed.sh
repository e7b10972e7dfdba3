#!/usr/bin/env bash
# Data-parallel training on this machine: the quickstart's LoRA (MiniLM, six projections,
# r 8, batch 32, length 64) for STEPS steps as one rank with 2 threads and as 2 ranks with 1
# thread each (`--nproc 2`, c10d Gloo over loopback), one run each in one run of this script.
# Prints training examples/s, wall time, peak RSS (one rank's; two ranks hold two
# processes), and what the all-reduce of the gradients costs per step (with it overlapped
# with backward, as by default, the time a step waits for it after backward; and once more
# with TESSERA_DP_OVERLAP=0, reduced after backward, all of it).
#   bash bench/distributed.sh [steps] [bucket_cap_mb]   (40, 25)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
steps=${1:-40} cap=${2:-25}
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
tessera=$root/build/bin/tessera
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat >"$out/run.toml" <<TOML
[model]
path = "$TESSERA_MODEL_DIR"
[data]
path = "$TESSERA_DATA_DIR/polarity.csv"
max_length = 64
padding = "max_length"
[train]
epochs = 1
batch_size = 32
max_steps = $steps
bucket_cap_mb = $cap
[[methods]]
plugin = "lora"
targets = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
[methods.params]
r = 8
lora_alpha = 16
TOML
run() {  # name, then the train options
  local name=$1; shift
  /usr/bin/time -v "$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/$name" "$@" >/dev/null 2>"$out/$name.time"
  "$TESSERA_VENV/bin/python" - "$out/$name" "$out/$name.time" "$name" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1] + "/result.json"))
t = open(sys.argv[2]).read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
dp = r.get("data_parallel", {})
extra = f" | {dp['allreduce_bytes_per_step'] / 2**20:.2f} MiB, {1e3 * dp['allreduce_seconds_per_step']:.1f} ms" if dp else " | —"
print(f"| {sys.argv[3]} | {r['examples_per_s']:.1f} | {wall} | {rss:.0f} MiB{extra} |")
PY
}
echo "| run | training examples/s | wall | peak RSS (one process) | all-reduce per step |"
echo "|---|---|---|---|---|"
run "1 rank x 2 threads" --threads 2
run "2 ranks x 1 thread" --threads 1 --nproc 2
TESSERA_DP_OVERLAP=0 run "2 ranks x 1 thread, reduced after backward" --threads 1 --nproc 2
