#!/usr/bin/env bash
# `tessera train --tensorboard`: the event files read back with tensorboard's own
# EventAccumulator hold the metrics' numbers — train/loss and train/lr at every step,
# test/<metric> at each epoch — to float32 precision.
#
# usage: tensorboard.sh TESSERA OUT_DIR PYTHON
set -euo pipefail
tessera=$1 out=$2 py=$3
rm -rf "$out" && mkdir -p "$out"
cat >"$out/run.toml" <<TOML
[model]
path = "\${TESSERA_MODEL_DIR}"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
limit = 200
max_length = 32
[train]
epochs = 2
batch_size = 16
[[methods]]
plugin = "lora"
targets = ["attn.q", "attn.v"]
TOML
"$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/run" --tensorboard >/dev/null
"$py" - "$out/run" <<'PY'
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = sys.argv[1]
acc = EventAccumulator(run + "/tensorboard")
acc.Reload()
lines = [json.loads(l) for l in open(run + "/metrics.jsonl")]
steps = [j for j in lines if j["event"] == "step"]
evals = [j for j in lines if j["event"] == "eval"]
assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "test/accuracy", "test/loss"}, acc.Tags()["scalars"]
for tag, key, rows in (("train/loss", "loss", steps), ("train/lr", "lr", steps), ("test/accuracy", "accuracy", evals), ("test/loss", "loss", evals)):
    got = [(e.step, e.value) for e in acc.Scalars(tag)]
    want = [(j["step"], j[key]) for j in rows]
    assert len(got) == len(want) == (20 if tag.startswith("train") else 2), (tag, len(got), len(want))
    for (gs, gv), (ws, wv) in zip(got, want):
        assert gs == ws and abs(gv - wv) <= 1e-6 * max(1.0, abs(wv)), (tag, gs, gv, ws, wv)
print(f"tensorboard: {len(steps)} steps and {len(evals)} evaluations read back equal")
PY
