#!/usr/bin/env bash
# Data-parallel training through c10d (Gloo): `tessera train --nproc 2` gives the adapter and
# losses of one process on the same global batches, within float tolerance (the sum over two
# ranks adds in another order); a rank killed mid-run stops the other within seconds, the
# launcher naming it, with no adapter half-written; a data-parallel run killed after a
# checkpoint resumes with one process and still ends at the same adapter; with dropout, a
# 2-rank run killed and resumed with 2 ranks ends bit for bit as the uninterrupted one; one
# process in 2 micro-batches is the 2-rank run bit for bit, and resumes as one, and 3 are 3
# ranks under ordered_reduction; tensors
# a step leaves unused (AdaMix's undrawn experts) do not hold the overlap.
#
# usage: distributed.sh TESSERA OUT_DIR PYTHON GPT2_TEXT_DIR
set -euo pipefail
tessera=$1 out=$2 py=$3 gpt2=$4
rm -rf "$out" && mkdir -p "$out"
# The models without their dropout: each rank would draw other masks than one process does
# on the whole batch (as with torch's DDP), and the comparison is of the reduction.
without_dropout() {  # model dir, copy
  mkdir -p "$2"
  for f in "$1"/*; do ln -s "$(realpath "$f")" "$2/"; done
  rm "$2/config.json"
  "$py" -c 'import json, sys; c = json.load(open(sys.argv[1])); c.update({k: 0.0 for k in c if "drop" in k and isinstance(c[k], float)}); json.dump(c, open(sys.argv[2], "w"))' \
    "$1/config.json" "$2/config.json"
}
without_dropout "$TESSERA_MODEL_DIR" "$out/model"
without_dropout "$gpt2" "$out/gpt2"
cat >"$out/run.toml" <<TOML
[model]
path = "$out/model"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
limit = 250
max_length = 32
[train]
epochs = 2
batch_size = 15
threads = 1
checkpoint_every = 3
bucket_cap_mb = 0.01  # several buckets, each reduced while backward runs
[[methods]]
plugin = "lora"
targets = ["attn.q", "attn.v", "mlp.down"]
[methods.params]
r = 4
lora_dropout = 0.0
init_lora_weights = "false"
TOML
# 200 training examples in batches of 15: the last batch (5) leaves the ranks 3 and 2.
"$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/one"
"$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/two" --nproc 2
[ ! -e "$out/two/adapter.partial" ]

same_metrics() {  # run, run: metrics.jsonl equal but for the seconds
  "$py" - "$1" "$2" <<'PY'
import json, sys
strip = lambda d: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(f"{d}/metrics.jsonl")]
a, b = strip(sys.argv[1]), strip(sys.argv[2])
assert a == b, [(x, y) for x, y in zip(a, b) if x != y][:2]
PY
}
# Same adapter, same losses, within float tolerance.
compare() {  # run, [reference run, steps, tolerance of an adapter tensor's largest entry]
  "$py" - "${2:-$out/one}" "$1" "${3:-28}" "${4:-1e-4}" <<'PY'
import json, sys
from safetensors.torch import load_file
a, b, n, tol = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
import glob
load = lambda d: {k: v for f in sorted(glob.glob(f"{d}/adapter/*/*.safetensors")) for k, v in load_file(f).items()}
ta, tb = load(a), load(b)
assert ta, f"no adapter tensors in {a}"
assert ta.keys() == tb.keys(), (ta.keys(), tb.keys())
worst = max(float((ta[k] - tb[k]).abs().max() / ta[k].abs().max().clamp_min(1e-12)) for k in ta)
steps = lambda d: [j for j in map(json.loads, open(f"{d}/metrics.jsonl")) if j["event"] == "step"]
sa, sb = steps(a), steps(b)
assert len(sa) == len(sb) == n, (len(sa), len(sb))
loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(sa, sb))
print(f"largest difference: adapter {worst:.2e} of its largest entry, loss {loss:.2e}")
assert worst < tol and loss < 1e-5, "the data-parallel run departs from the one-process run"
PY
}
compare "$out/two"

# A causal LM: the loss averages over labelled tokens, so each rank's gradient is weighed by
# its share of the batch's tokens (sentences differ in length), not of its examples.
cat >"$out/lm.toml" <<TOML
[model]
path = "$out/gpt2"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
text_column = "text"
limit = 125
max_length = 24
[task]
kind = "causal-lm"
[train]
epochs = 1
batch_size = 10
threads = 1
lr = 1e-2
[[methods]]
plugin = "lora"
targets = ["attn.q", "attn.v", "mlp.up"]
[methods.params]
r = 4
init_lora_weights = "false"
TOML
"$tessera" --log-level warn train "$out/lm.toml" --run-dir "$out/lm-one" >/dev/null
"$tessera" --log-level warn train "$out/lm.toml" --run-dir "$out/lm-two" --nproc 2 >/dev/null
compare "$out/lm-two" "$out/lm-one" 10

# Tensors a step leaves unused (AdaMix trains one drawn expert per layer): the graph walk after
# forward marks them, so every bucket still starts before backward ends, and the update is the
# one-process run's (every rank draws the same experts from the same stream).
sed -e '/^\[\[methods\]\]/,$d' "$out/run.toml" >"$out/adamix.toml"
cat >>"$out/adamix.toml" <<TOML
[[methods]]
plugin = "adamix"
name = "adamix"
[methods.params]
num_experts = 4
reduction_factor = 16.0
consistency_weight = 0.0
TOML
"$tessera" --log-level warn train "$out/adamix.toml" --run-dir "$out/adamix-one" >/dev/null
"$tessera" --log-level warn train "$out/adamix.toml" --run-dir "$out/adamix-two" --nproc 2 >/dev/null
# The experts' down-projections start with no gradient (the up-projection starts at 0), and
# AdamW divides their first tiny gradients by their own size: the two summation orders part
# them by ~1e-5 after 28 steps (2e-4 of the largest entry), where LoRA's part by ~1e-7.
compare "$out/adamix-two" "$out/adamix-one" 28 1e-3
"$py" - "$out/adamix-two/result.json" <<'PY'
import json, sys
dp = json.load(open(sys.argv[1]))["data_parallel"]
print(f"adamix over 2 ranks: {dp['unused_tensors_per_step']:.1f} unused tensors a step, {100 * dp['allreduce_overlapped']:.0f}% of the buckets "
      f"started before backward ended, the graph walk {1e3 * dp['graph_walk_seconds_per_step']:.2f} ms a step")
# One adapter per layer of the 6, 4 down-projection experts (weight, bias) and a shared up-projection:
# the 3 undrawn experts' 2 tensors in each layer get no gradient.
assert dp["unused_tensors_per_step"] == 6 * 3 * 2 and dp["allreduce_overlapped"] == 1.0, dp
PY

# A rank killed with SIGKILL: the other is stopped within seconds, the launcher names it.
setsid "$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/killed" --nproc 2 2>"$out/err.txt" &
launcher=$!
for _ in $(seq 1 600); do
  [ -f "$out/killed/metrics.jsonl" ] && grep -q '"step":4' "$out/killed/metrics.jsonl" && break
  sleep 0.05
done
ranks=($(pgrep -P "$launcher"))
[ "${#ranks[@]}" -eq 2 ]
kill -9 "${ranks[1]}"
start=$(date +%s)
set +e
wait "$launcher"
rc=$?
set -e
cat "$out/err.txt"
[ "$rc" -eq 1 ]
(($(date +%s) - start <= 10))
grep -q "rank [01] of 2 (pid ${ranks[1]}) was killed by signal 9 (Killed): the other ranks were stopped" "$out/err.txt"
! pgrep -P "$launcher" >/dev/null
[ ! -e "$out/killed/adapter.partial" ]

# That run resumed from its checkpoint with one process: the same adapter as before.
ls "$out/killed/checkpoints" | grep -q '^step-'
"$tessera" --log-level warn train --resume "$out/killed"
compare "$out/killed"
# With dropout (the model's and LoRA's), a 2-rank run killed by the launcher's SIGKILL after a
# checkpoint and resumed with 2 ranks ends bit for bit as the uninterrupted 2-rank run: every
# rank's random streams come back as they were.
sed -e "s|^path = \"$out/model\"|path = \"$TESSERA_MODEL_DIR\"|" -e 's|^lora_dropout = 0.0|lora_dropout = 0.1|' "$out/run.toml" >"$out/drop.toml"
"$tessera" --log-level warn train "$out/drop.toml" --run-dir "$out/drop" --nproc 2
killed_at() {  # step, config, run dir, train args...: the run's process group SIGKILLed once it logs that step
  local step=$1 config=$2 run=$3
  shift 3
  setsid "$tessera" --log-level warn train "$config" --run-dir "$run" "$@" 2>/dev/null &
  local group=$!
  for _ in $(seq 1 600); do
    [ -f "$run/metrics.jsonl" ] && grep -q "\"step\":$step" "$run/metrics.jsonl" && break
    sleep 0.05
  done
  kill -9 -- "-$group" 2>/dev/null || true
  wait "$group" 2>/dev/null || true
  ls "$run/checkpoints" | grep -q '^step-'
}
killed_at 11 "$out/drop.toml" "$out/drop-killed" --nproc 2
"$tessera" --log-level warn train --resume "$out/drop-killed" --nproc 2
cmp "$out/drop/adapter/lora/adapter_model.safetensors" "$out/drop-killed/adapter/lora/adapter_model.safetensors"
same_metrics "$out/drop" "$out/drop-killed"
# One process in 2 micro-batches ([train] micro_batches = 2, one thread) takes the 2-rank run's
# steps bit for bit, dropout included: piece k is rank k's shard and draws from a stream of its
# own, its gradient is weighted as the reducer weighs a rank's, and two gradients add up the
# same in either order.
sed -e 's|^bucket_cap_mb = .*|micro_batches = 2|' "$out/drop.toml" >"$out/micro.toml"
grep -q '^micro_batches = 2' "$out/micro.toml"
"$tessera" --log-level warn train "$out/micro.toml" --run-dir "$out/micro"
cmp "$out/drop/adapter/lora/adapter_model.safetensors" "$out/micro/adapter/lora/adapter_model.safetensors"
same_metrics "$out/drop" "$out/micro"
# Killed after a checkpoint and resumed as 2 ranks of one micro-batch each: every stream comes
# back to the rank it stood for, and the run still ends as the uninterrupted 2-rank run.
killed_at 8 "$out/micro.toml" "$out/micro-killed"
"$tessera" --log-level warn train --resume "$out/micro-killed" "$out/drop.toml" --nproc 2
cmp "$out/drop/adapter/lora/adapter_model.safetensors" "$out/micro-killed/adapter/lora/adapter_model.safetensors"
same_metrics "$out/drop" "$out/micro-killed"
# Three ranks: a sum of three depends on the order its terms are added in, and an all-reduce's
# ring adds them in an order of its own. With [train] ordered_reduction every rank's bucket
# (and loss) is gathered and added in rank order, as one process adds its 3 micro-batches:
# the same steps bit for bit, dropout included.
sed -e 's|^bucket_cap_mb = .*|&\nordered_reduction = true|' "$out/drop.toml" >"$out/ordered.toml"
grep -q '^ordered_reduction = true' "$out/ordered.toml"
"$tessera" --log-level warn train "$out/ordered.toml" --run-dir "$out/three" --nproc 3
sed -e 's|^bucket_cap_mb = .*|micro_batches = 3|' "$out/drop.toml" >"$out/micro3.toml"
"$tessera" --log-level warn train "$out/micro3.toml" --run-dir "$out/micro3"
cmp "$out/three/adapter/lora/adapter_model.safetensors" "$out/micro3/adapter/lora/adapter_model.safetensors"
same_metrics "$out/three" "$out/micro3"
echo "distributed: equal across 1 and 2 ranks; a killed rank stops the run; resumed across N; resumed with dropout bit for bit; 2 micro-batches are 2 ranks bit for bit, 3 are 3 ordered ranks"
