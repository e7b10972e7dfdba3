#!/usr/bin/env bash
# Exact resume after kill -9: a run killed at a random step (KILLS times, each after a
# resume) and resumed each time ends with the adapter, metrics and test accuracy of an
# uninterrupted run with the same seed and threads, bit for bit. Then: a corrupt newest
# checkpoint is skipped for the one before (said in one line) and the result is still equal;
# a config changed since the checkpoint is refused naming the key; a run without a
# checkpoint is refused. bench/resume_kill.sh runs the kill loop many times.
#
# usage: resume.sh TESSERA OUT_DIR [KILLS] [PLUGIN]   (KILLS: 1; PLUGIN: lora, or all: the five
# plugins below in one run, Child-Tuning in both modes)
set -euo pipefail
tessera=$1 out=$2 kills=${3:-1} plugin=${4:-lora}
rm -rf "$out" && mkdir -p "$out"
targets='["attn.q", "attn.v"]'
case $plugin in
lora) params='r = 4
lora_dropout = 0.1' ;;  # dropout: tessera::dropout's draws must resume too
dylora) params='r = 4' ;;   # its own generator draws each step's rank
adalora) params='init_r = 4
target_r = 2
tinit = 4
tfinal = 8
deltaT = 2' ;;              # importance averages and masks
child_tuning) targets='["mlp.down.weight"]' params='mode = "task_free"' ;;  # its mask generator
diff_pruning) targets='["mlp.down.weight"]' params='structured = false' ;;  # noise generators; the projection at step 20
*) params='' ;;
esac
methods="[[methods]]
plugin = \"$plugin\"
targets = $targets
[methods.params]
$params"
if [ "$plugin" = all ]; then  # every method above in one run, on sites of their own
  methods='[[methods]]
plugin = "lora"
targets = ["attn.q"]
[methods.params]
r = 4
lora_dropout = 0.1
[[methods]]
plugin = "dylora"
targets = ["attn.v"]
[methods.params]
r = 4
[[methods]]
plugin = "adalora"
targets = ["attn.k", "attn.o"]
[methods.params]
init_r = 4
target_r = 2
tinit = 4
tfinal = 8
deltaT = 2
[[methods]]
plugin = "child_tuning"
targets = ["layers.[0-2].mlp.down.weight"]
[methods.params]
mode = "task_free"
[[methods]]
plugin = "child_tuning"
name = "child_driven"
targets = ["layers.[0-2].mlp.up.weight"]
[methods.params]
mode = "task_driven"
[[methods]]
plugin = "diff_pruning"
targets = ["layers.[3-5].mlp.down.weight"]
[methods.params]
structured = false'
fi
cat >"$out/run.toml" <<TOML
[model]
path = "\${TESSERA_MODEL_DIR}"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
limit = 400
max_length = 32
[train]
epochs = 2
batch_size = 16
threads = 2
checkpoint_every = 4
$methods
TOML
"$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/whole"
steps=$(grep -c '"event":"step"' "$out/whole/metrics.jsonl")

# The metrics without the steps' wall times, which no two runs share.
same_metrics() { diff <(sed 's/,"seconds":[^,}]*//' "$1") <(sed 's/,"seconds":[^,}]*//' "$2"); }
same_run() {
  same_metrics "$out/whole/metrics.jsonl" "$1/metrics.jsonl"
  diff -r "$out/whole/adapter" "$1/adapter"
  diff <(grep test_ "$out/whole/result.json") <(grep test_ "$1/result.json")
}

# Starts a run (or a resume) and kills it with SIGKILL once metrics.jsonl holds `at` steps.
kill_at() {
  local at=$1; shift
  "$tessera" --log-level warn "$@" >/dev/null 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ -f "$out/killed/metrics.jsonl" ] && [ "$(grep -c '"event":"step"' "$out/killed/metrics.jsonl")" -ge "$at" ]; then
      kill -9 "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.02
  done
  wait "$pid" 2>/dev/null || true
}

# Kills land at steps 5 … steps − 6: a run must not finish between the count and the signal.
at=$((RANDOM % (steps - 10) + 5))
kill_at "$at" train "$out/run.toml" --run-dir "$out/killed"
for ((k = 1; k < kills; k++)); do
  done_steps=$(grep -c '"event":"step"' "$out/killed/metrics.jsonl")
  ((done_steps < steps - 8)) || break
  kill_at $((done_steps + RANDOM % (steps - 6 - done_steps) + 1)) train --resume "$out/killed"
done
echo "killed at step $(grep -c '"event":"step"' "$out/killed/metrics.jsonl") of $steps ($plugin); resuming"
[ ! -f "$out/killed/result.json" ] || { echo "the run finished before it was killed: nothing was tested"; exit 1; }
ls "$out/killed/checkpoints" | grep -q '^step-'
"$tessera" --log-level warn train --resume "$out/killed"
same_run "$out/killed"

# The newest checkpoint corrupt: skipped for the one before, in one line; still equal.
rm -rf "$out/killed"  # (not --overwrite: the old metrics would read as the new run's steps)
kill_at $((steps / 2 + 3)) train "$out/run.toml" --run-dir "$out/killed"
newest=$(ls -d "$out"/killed/checkpoints/step-* | sort | tail -n 1)
[ "$(ls -d "$out"/killed/checkpoints/step-* | wc -l)" -eq 2 ]  # the newest two are kept
truncate -s 100 "$newest/tensors.safetensors"
"$tessera" train --resume "$out/killed" 2>"$out/err.txt" >/dev/null
grep -q "checkpoint $newest does not read back whole (.*): skipped for the one before" "$out/err.txt"
same_run "$out/killed"

# A config that changed since the checkpoint is refused, naming the key; epochs may change.
rm -rf "$out/killed"
kill_at 6 train "$out/run.toml" --run-dir "$out/killed"
sed 's/^batch_size = 16/batch_size = 8/' "$out/run.toml" >"$out/changed.toml"
if "$tessera" train --resume "$out/killed" "$out/changed.toml" 2>"$out/err.txt"; then exit 1; fi
grep -q "the config changed since the checkpoint (train.batch_size: 16 → 8); only \[train\] epochs, checkpoint_every, bucket_cap_mb, micro_batches and ordered_reduction may change" "$out/err.txt"
rm -rf "$out/empty" && mkdir -p "$out/empty"
if "$tessera" train --resume "$out/empty" 2>"$out/err.txt"; then exit 1; fi
grep -q "holds no complete checkpoint to resume from" "$out/err.txt"
echo "resume: equal after kill -9 ($plugin)"
