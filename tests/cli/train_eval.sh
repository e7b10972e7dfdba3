#!/usr/bin/env bash
# `tessera train` then `tessera eval` on a small real run: eval must reproduce the
# recorded test accuracy exactly. A bad config must end in one line and exit 1.
set -euo pipefail
tessera=$1 out=$2 test_plugins=$3
rm -rf "$out" && mkdir -p "$out"
cat >"$out/run.toml" <<TOML
[model]
path = "\${TESSERA_MODEL_DIR}"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
limit = 200
max_length = 32
[train]
epochs = 1
batch_size = 16
max_steps = 3
[[methods]]
plugin = "lora"
targets = ["attn.q", "attn.v"]
[methods.params]
r = 4
TOML
"$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/run"
"$tessera" eval "$out/run" | tee "$out/eval.txt"
grep -q "reproduces the accuracy recorded at training time" "$out/eval.txt"
# --json: one JSON line on stdout (the verdict inside it and on stderr); --merge: LoRA folded
# into the weights first, the same accuracy to rounding, no exact comparison.
"$tessera" eval "$out/run" --json >"$out/eval.json" 2>/dev/null
[ "$(wc -l <"$out/eval.json")" -eq 1 ] && grep -q '"reproduces":true' "$out/eval.json" && grep -q '"examples_per_s":[1-9]' "$out/eval.json"
"$tessera" eval "$out/run" --merge | tee "$out/eval-merged.txt"
grep -q "examples/s, merged)" "$out/eval-merged.txt" && ! grep -q "recorded at training time" "$out/eval-merged.txt"
# --disable / --scale evaluate another model than the one trained: no comparison; a name the
# run lacks and a scale without a number are refused.
"$tessera" eval "$out/run" --disable lora | tee "$out/eval-off.txt"
grep -q "on [0-9]* examples" "$out/eval-off.txt" && ! grep -q "recorded at training time" "$out/eval-off.txt"
if "$tessera" eval "$out/run" --disable lorra 2>"$out/err.txt"; then exit 1; fi
grep -q "no method instance or group is named 'lorra' (the run has: lora)" "$out/err.txt"
if "$tessera" eval "$out/run" --scale lora=half 2>"$out/err.txt"; then exit 1; fi
grep -q -- "--scale lora=half: write NAME=F" "$out/err.txt"
# A run no longer than the timing's warm-up (3 steps) still reports its speed.
grep -Eq '"examples_per_s": [1-9]' "$out/run/result.json"
grep -Eq '^\| examples/s \(training\) \| [1-9]' "$out/run/report.md"
# A result.json without the accuracy is said so; one with a wrong value is named, exit 1.
cp "$out/run/result.json" "$out/result.json"
sed -i '/"test_accuracy"/d' "$out/run/result.json"
"$tessera" eval "$out/run" | grep -q "result.json records no test accuracy to compare with"
sed 's/"test_accuracy": [^,]*/"test_accuracy": "high"/' "$out/result.json" >"$out/run/result.json"
set +e
"$tessera" eval "$out/run" >/dev/null 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[ "$rc" -eq 1 ]
grep -q "run/result.json: test_accuracy must be a number, got \"high\"" "$out/err.txt"
cp "$out/result.json" "$out/run/result.json"

# Training into a directory that holds a run is refused without --overwrite; with it, a
# config that fails to load leaves the earlier run whole (eval still reproduces it).
set +e
"$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/run" 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[ "$rc" -eq 1 ]
grep -q "run holds an earlier run (config.toml, metrics.jsonl, result.json, report.md, adapter/): pass --overwrite to replace it" "$out/err.txt"
sed 's|^path = "${TESSERA_MODEL_DIR}"|path = "/nonexistent/model"|' "$out/run.toml" >"$out/broken.toml"
set +e
"$tessera" --log-level warn train "$out/broken.toml" --run-dir "$out/run" --overwrite 2>"$out/err.txt"
rc=$?
set -e
[ "$rc" -eq 1 ]
"$tessera" eval "$out/run" | grep -q "reproduces the accuracy recorded at training time"

# The adapter's manifest is checked against the run: labels in another order (the head's
# rows would be read as other classes) are refused, naming tessera.json.
manifest="$out/run/adapter/tessera.json"
cp "$manifest" "$out/tessera.json"
"$TESSERA_VENV/bin/python" - "$manifest" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["labels"] = m["labels"][::-1]
json.dump(m, open(sys.argv[1], "w"))
PY
set +e
"$tessera" eval "$out/run" 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[ "$rc" -eq 1 ]
grep -q 'adapter/tessera.json: labels are \[1, 0\], but the data now gives \[0, 1\]' "$out/err.txt"
cp "$out/tessera.json" "$manifest"

# --overwrite replaces the run whole: a renamed method leaves no folder of the old name.
sed 's|^\[methods.params\]|name = "q_and_v"\n[methods.params]|' "$out/run.toml" >"$out/renamed.toml"
"$tessera" --log-level warn train "$out/renamed.toml" --run-dir "$out/run" --overwrite
[ -d "$out/run/adapter/q_and_v" ] && [ ! -e "$out/run/adapter/lora" ] && [ ! -e "$out/run/adapter.partial" ]
[ "$(grep -c '"event":"eval"' "$out/run/metrics.jsonl")" -eq 1 ]
"$tessera" eval "$out/run" | grep -q "reproduces the accuracy recorded at training time"

# A directory that is not a run is named as such.
set +e
"$tessera" eval "$out" 2>"$out/err.txt"
rc=$?
set -e
[ "$rc" -eq 1 ]
grep -q "is not a run directory of \`tessera train\` (it needs config.toml and adapter/)" "$out/err.txt"

printf '[model]\npath = "/x"\n[data]\npath = "/y"\n[train]\nepochs = "two"\n' >"$out/bad.toml"
set +e
"$tessera" train "$out/bad.toml" 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[ "$rc" -eq 1 ]
[ "$(wc -l <"$out/err.txt")" -eq 1 ]
grep -q "bad.toml:6:10: 'epochs' must be an integer" "$out/err.txt"
# The frozen baseline (no methods: the config written back holds `methods = []`) evaluates.
sed '/^\[\[methods\]\]/,$d' "$out/run.toml" >"$out/frozen.toml"
"$tessera" --log-level warn train "$out/frozen.toml" --run-dir "$out/frozen"
grep -q '^methods = \[\]' "$out/frozen/config.toml"
"$tessera" eval "$out/frozen" | grep -q "reproduces the accuracy recorded at training time"

# A run trained with a plugin from --plugin-dir: eval without it names the plugin, where it
# came from and the option; with it, the run reproduces.
printf '\n[[methods]]\nplugin = "probe"\ntargets = ["attn.o"]\n[methods.params]\nvalue = 0.5\n' >>"$out/frozen.toml"
"$tessera" --log-level warn --plugin-dir "$test_plugins" train "$out/frozen.toml" --run-dir "$out/probe"
set +e
"$tessera" eval "$out/probe" 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[ "$rc" -eq 1 ]
grep -q "method 'probe' needs plugin 'probe' (at training time version [0-9.]* from $test_plugins/[^ ]*), which is not among the plugins found: pass --plugin-dir $test_plugins (before \`eval\`)" "$out/err.txt"
"$tessera" --plugin-dir "$test_plugins" eval "$out/probe" | grep -q "reproduces the accuracy recorded at training time"
# A plugin whose intervention throws in the forward pass: the run fails with one line naming
# plugin, instance and site, leaves nothing half-written, and the next command runs.
sed 's/^value = 0.5$/kind = "throw_forward"/' "$out/frozen.toml" | sed 's/^plugin = "probe"$/plugin = "probe"\nname = "faulty"/' >"$out/faulty.toml"
set +e
"$tessera" --log-level warn --plugin-dir "$test_plugins" train "$out/faulty.toml" --run-dir "$out/faulty" 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[ "$rc" -eq 1 ]
grep -q "plugin 'probe' (instance 'faulty') at site 'layers.0.attn.o': probe fails in forward" "$out/err.txt"
[ ! -e "$out/faulty/result.json" ]
"$tessera" --plugin-dir "$test_plugins" eval "$out/probe" | grep -q "reproduces the accuracy recorded at training time"
# `tessera sites` lists what targets can name: the real MiniLM's 36 linear sites, a pattern's
# matches with their Hugging Face paths and shapes, the norms' parameters; no match is an error.
"$tessera" sites "$TESSERA_MODEL_DIR" >"$out/sites.txt"
[ "$(grep -c '^linear ' "$out/sites.txt")" -eq 36 ]
grep -q '^parameter  layers.0.attn.norm.weight  encoder.layer.0.attention.output.LayerNorm.weight  (384)  accepts: delta$' "$out/sites.txt"
"$tessera" sites "$TESSERA_MODEL_DIR" query >"$out/sites.txt"
[ "$(wc -l <"$out/sites.txt")" -eq 6 ]
grep -q '^linear  layers.3.attn.q  encoder.layer.3.attention.self.query  384 -> 384, bias  accepts: weight_delta' "$out/sites.txt"
set +e
"$tessera" sites "$TESSERA_MODEL_DIR" no_such_site 2>"$out/err.txt"
rc=$?
set -e
[ "$rc" -eq 1 ] && grep -q "matches 'no_such_site'" "$out/err.txt"
# A gated group through the binary: its gates train with the methods, are saved as
# adapter/groups.safetensors and read back, so eval reproduces the run; disabling the group
# (every member) is another model, evaluated without comparison.
head -n 10 "$out/run.toml" >"$out/gated.toml"  # [model], [data], [train]
cat >>"$out/gated.toml" <<'TOML'
[[methods]]
plugin = "lora"
name = "lora"
targets = ["attn.q", "attn.v"]
[methods.params]
r = 4
init_lora_weights = "false"
[[methods]]
plugin = "compacter"
name = "phm"
[methods.params]
config = "compacter++"
[[groups]]
name = "gate"
kind = "gated"
members = ["lora", "phm"]
TOML
"$tessera" --log-level warn train "$out/gated.toml" --run-dir "$out/gated"
[ -s "$out/gated/adapter/groups.safetensors" ]
"$tessera" eval "$out/gated" | grep -q "reproduces the accuracy recorded at training time"
"$tessera" eval "$out/gated" --disable gate | grep -q "test accuracy"
echo "cli train/eval: ok"
