#!/usr/bin/env bash
# Data-parallel training through c10d (Gloo): `tessera train --nproc 2` gives the adapter and
# losses of one process on the same global batches, within float tolerance (the sum over two
# ranks adds in another order); a rank killed mid-run stops the other within seconds, the
# launcher naming it, with no adapter half-written; a data-parallel run killed after a
# checkpoint resumes with one process and still ends at the same adapter.
#
# usage: distributed.sh TESSERA OUT_DIR PYTHON
set -euo pipefail
tessera=$1 out=$2 py=$3
rm -rf "$out" && mkdir -p "$out"
# The encoder without its dropout: each rank would draw other masks than one process does
# on the whole batch (as with torch's DDP), and the comparison is of the reduction.
mkdir -p "$out/model"
for f in "$TESSERA_MODEL_DIR"/*; do ln -s "$f" "$out/model/"; done
rm "$out/model/config.json"
"$py" -c 'import json, sys; c = json.load(open(sys.argv[1])); c["hidden_dropout_prob"] = c["attention_probs_dropout_prob"] = 0.0; json.dump(c, open(sys.argv[2], "w"))' \
  "$TESSERA_MODEL_DIR/config.json" "$out/model/config.json"
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

# Same adapter, same losses, within float tolerance.
compare() {
  "$py" - "$out/one" "$1" <<'PY'
import json, sys
from safetensors.torch import load_file
a, b = sys.argv[1], sys.argv[2]
ta = load_file(f"{a}/adapter/lora/adapter_model.safetensors")
tb = load_file(f"{b}/adapter/lora/adapter_model.safetensors")
assert ta.keys() == tb.keys(), (ta.keys(), tb.keys())
worst = max(float((ta[k] - tb[k]).abs().max() / ta[k].abs().max()) for k in ta)
steps = lambda d: [j for j in map(json.loads, open(f"{d}/metrics.jsonl")) if j["event"] == "step"]
sa, sb = steps(a), steps(b)
assert len(sa) == len(sb) == 28, (len(sa), len(sb))
loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(sa, sb))
print(f"largest difference: adapter {worst:.2e} of its largest entry, loss {loss:.2e}")
assert worst < 1e-4 and loss < 1e-5, "the data-parallel run departs from the one-process run"
PY
}
compare "$out/two"

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
echo "distributed: equal across 1 and 2 ranks; a killed rank stops the run; resumed across N"
