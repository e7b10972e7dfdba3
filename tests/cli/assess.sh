#!/usr/bin/env bash
# `tessera assess` on a small matrix: three setups (inline LoRA, full fine-tuning, prompt
# tuning from a config file) × two seeds, one setup naming an unknown plugin, one listing a seed
# twice and one that diverges. Their rows say why (file, line, column; the step) while the rest
# runs and the exit status is 4; report.html's table parses back to the numbers each run wrote
# (assess_check.py, reading the runs' own result.json); a second call runs nothing again; a bad
# matrix ends in one line, exit 1; --peers puts peft's (and AdapterHub's, for MAM) run of the
# same task beside ours, on the encoder and on the real decoder.
set -euo pipefail
tessera=$1 out=$2 python=$3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rm -rf "$out" && mkdir -p "$out"
cat >"$out/base.toml" <<TOML
[model]
path = "\${TESSERA_MODEL_DIR}"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
limit = 200
max_length = 32
[train]
epochs = 1
batch_size = 16
threads = 1
TOML
cat >"$out/prompt.toml" <<TOML
[model]
path = "\${TESSERA_MODEL_DIR}"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
[train]
lr = 3e-2
[[methods]]
plugin = "prompt_tuning"
name = "prompt"
[methods.params]
num_virtual_tokens = 4
TOML
cat >"$out/matrix.toml" <<TOML
base = "base.toml"
seeds = [1, 2]
out = "assessed"
[train]
max_steps = 4

[[setups]]
name = "lora"
[[setups.methods]]
plugin = "lora"
name = "lora"
targets = ["attn.q", "attn.v"]
[setups.methods.params]
r = 4

[[setups]]
name = "full"
[[setups.methods]]
plugin = "full"
name = "full"
[setups.train]
lr = 5e-5

[[setups]]
name = "prompt"
config = "prompt.toml"

[[setups]]
name = "broken"
[[setups.methods]]
plugin = "lorra"

[[setups]]
name = "twice"
seeds = [5, 5]
[[setups.methods]]
plugin = "lora"

[[setups]]
name = "diverging"
[[setups.methods]]
plugin = "lora"
targets = ["attn.q"]
[setups.train]
lr = 1e30                      # Adam's step is about lr whatever the gradient: inf, then nan
TOML
status=0
"$tessera" assess "$out/matrix.toml" >"$out/first.txt" 2>"$out/first.err" || status=$?
cat "$out/first.txt"
[ "$status" -eq 4 ] || { echo "a matrix with a failing setup must exit 4, got $status"; cat "$out/first.err"; exit 1; }
grep -q "matrix.toml:[0-9]*:[0-9]*: no plugin with id 'lorra' (did you mean 'lora'?)" "$out/assessed/report.md"
grep -q "^| diverging |.*2 of 2 failed: training diverged at step [0-9]* (epoch 1)" "$out/assessed/report.md"
grep -q "^| twice |.*matrix.toml:[0-9]*:[0-9]*: seed 5 is listed twice" "$out/assessed/report.md"
"$python" "$here/assess_check.py" "$out/assessed"

# Nothing is run again: the runs' files stay as they were.
stamp() { find "$out/assessed" -name result.json -printf '%p %T@\n' | sort; }
before=$(stamp)
status=0
"$tessera" assess "$out/matrix.toml" >/dev/null 2>"$out/second.err" || status=$?
[ "$status" -eq 4 ] && [ "$before" = "$(stamp)" ]
"$python" "$here/assess_check.py" "$out/assessed"

# A matrix that cannot be read at all: one line naming file, line and column.
printf 'base = "base.toml"\nseed = [1]\n[[setups]]\nname = "x"\n' >"$out/bad.toml"
if "$tessera" assess "$out/bad.toml" 2>"$out/bad.err"; then exit 1; fi
grep -q "bad.toml:2:8: unknown key 'seed' (did you mean 'seeds'?)" "$out/bad.err"
# --peers: the peer library on the same task (one epoch of the 200-sentence sample), for each
# seed of ours (LoRA's own two), its mean ± sd in report.html's peers table; a method no peer
# has says so; MAM's composition group runs as AdapterHub's MAMConfig.
cat >"$out/peers.toml" <<TOML
base = "base.toml"
seeds = [3]
out = "peered"
[[setups]]
name = "lora"
seeds = [3, 4]              # its own seeds: two rows of ours, two of the peer's
[[setups.methods]]
plugin = "lora"
targets = ["attn.q", "attn.v"]
[setups.methods.params]
r = 4
[[setups]]
name = "bitfit"
seeds = [3, 4]
[[setups.methods]]
plugin = "bitfit"
[[setups]]
name = "mam"
config = "$(cd "$here/../.." && pwd)/configs/hybrid/mam.toml"
TOML
"$tessera" assess --peers "$out/peers.toml" >"$out/peers.txt" 2>"$out/peers.err" || { cat "$out/peers.err" "$out/peered/peers.log"; exit 1; }
"$python" "$here/assess_check.py" "$out/peered" peers
# A second call runs no peer again: every seed is there.
cp "$out/peered/peers.json" "$out/peers-before.json"
"$tessera" assess --peers "$out/peers.toml" >/dev/null 2>"$out/peers-again.err" || { cat "$out/peers-again.err"; exit 1; }
cmp "$out/peers-before.json" "$out/peered/peers.json"
if grep -q "assess_peers\] .*seed" "$out/peered/peers.log"; then echo "a peer ran again"; cat "$out/peered/peers.log"; exit 1; fi
# A seed dropped from a setup leaves the peer's means too (its run stays kept in peers.json).
sed 's/^seeds = \[3, 4\]  *# its own seeds.*$/seeds = [3]/' "$out/peers.toml" >"$out/peers-one.toml"
"$tessera" assess --peers "$out/peers-one.toml" >/dev/null 2>"$out/peers-one.err" || { cat "$out/peers-one.err"; exit 1; }
"$python" - "$out/peered/peers.json" <<'PY'
import json, sys
lora = json.load(open(sys.argv[1]))["lora"]
three = next(r for r in lora["runs"] if r["seed"] == 3)
assert lora["seeds"] == [3] and len(lora["runs"]) == 2 and lora["test_accuracy"] == three["test_accuracy"], lora
assert lora["metric_spread"] == 0 and lora["metric_values"] == [three["test_accuracy"]], lora
PY
# The decoder's peers: peft on the real SmolLM2 over Tessera's own batches (split, shuffle and
# length grouping rebuilt by bench/peer_lm_peft.py), so (IA)³, which draws nothing at random,
# must reach our test perplexity; a plugin peft lacks says so.
cat >"$out/lm.toml" <<TOML
[model]
path = "\${TESSERA_DECODER_DIR}"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
text_column = "text"
limit = 130                 # 104 to train on in batches of 2: two windows of 50 batches
max_length = 32
[task]
kind = "causal-lm"
[train]
epochs = 2                  # the second epoch's order from its own seed
batch_size = 2
lr = 3e-3
threads = 1
group_by_length = true
TOML
cat >"$out/lm-peers.toml" <<TOML
base = "lm.toml"
seeds = [5]
out = "lm-peered"
[[setups]]
name = "ia3"
[[setups.methods]]
plugin = "ia3"
[[setups]]
name = "dylora"
[[setups.methods]]
plugin = "dylora"
targets = ["attn.q", "attn.v"]
[setups.train]
epochs = 1                  # it is here for the peer's refusal alone
TOML
"$tessera" assess --peers "$out/lm-peers.toml" >"$out/lm-peers.txt" 2>"$out/lm-peers.err" || { cat "$out/lm-peers.err" "$out/lm-peered/peers.log"; exit 1; }
"$python" "$here/assess_check.py" "$out/lm-peered" lm-peers

# The shipped matrices build: every setup's config read and its methods validated.
root=$(cd "$here/../.." && pwd)
"$tessera" assess --check "$root/configs/assess/quickstart.toml"
"$tessera" assess --check "$root/configs/assess/smollm2.toml"
echo "assess: ok"
