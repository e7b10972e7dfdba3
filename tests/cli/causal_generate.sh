#!/usr/bin/env bash
# A causal-LM run through the binary on a tiny GPT-2 with a real BPE tokenizer: train,
# eval reproduces the recorded next-token accuracy, `generate` continues a prompt from
# the run (greedy twice: the same text; sampled with a seed: repeatable); a T5 answers;
# an AdapterHub adapter decodes as in AdapterHub, and a bottleneck run reloads.
set -euo pipefail
tessera=$1 model=$2 out=$3 t5=$4 test_plugins=$5 adapters=$6
rm -rf "$out" && mkdir -p "$out"
cat >"$out/run.toml" <<TOML
[model]
path = "$model"
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
limit = 200
max_length = 32
[task]
kind = "causal-lm"
[train]
epochs = 1
batch_size = 16
lr = 3e-2
max_steps = 4
[[methods]]
plugin = "lora"
targets = ["c_attn", "mlp.down"]
TOML
"$tessera" --log-level warn train "$out/run.toml" --run-dir "$out/run" | tee "$out/train.txt"
grep -q "test perplexity" "$out/train.txt"
grep -q '"test_perplexity"' "$out/run/result.json"
"$tessera" eval "$out/run" | tee "$out/eval.txt"
grep -q "reproduces the accuracy recorded at training time" "$out/eval.txt"

a=$("$tessera" generate --run "$out/run" "the film is" --max-new-tokens 8)
b=$("$tessera" generate --run "$out/run" "the film is" --max-new-tokens 8)
[[ "$a" == "the film is"* && "$a" == "$b" ]]
# Folded into the weights the adapter decodes too (merging itself is held to peft and to
# the unmerged model in the LoRA and decoder tests; here only rounding differs).
m=$("$tessera" generate --run "$out/run" "the film is" --max-new-tokens 8 --merge)
[[ "$m" == "the film is"* ]]
echo "unmerged: $a"
echo "merged:   $m"
# A method that cannot fold is refused before the first token, by name (the probe test
# plugin added to a copy of the run).
cp -r "$out/run" "$out/run2" && mkdir -p "$out/run2/adapter/probe"
cp "$out/run2/adapter/lora/adapter_model.safetensors" "$out/run2/adapter/probe/"
printf '\n[[methods]]\nname = "probe"\nplugin = "probe"\ntargets = ["attn.o"]\n' >>"$out/run2/config.toml"
python3 - "$out/run2/adapter/tessera.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["methods"].append({"name": "probe", "plugin": "probe", "targets": ["attn.o"], "dir": "probe"})
json.dump(m, open(sys.argv[1], "w"))
PY
set +e
"$tessera" --plugin-dir "$test_plugins" generate --run "$out/run2" "the film is" --merge >"$out/merged.txt" 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[[ $rc == 1 && ! -s "$out/merged.txt" ]] && grep -q "\-\-merge: plugin 'probe' (instance 'probe') is not mergeable: its effect cannot be folded into the weights" "$out/err.txt"
# An adapter AdapterHub saved (Houlsby, tests/fixtures/make_adapters.py) decodes as AdapterHub
# decodes it, greedily, token for token.
h=$("$tessera" generate --model "$model" --adapterhub "$adapters/gpt2_text_double_seq_bn" "the film is" --max-new-tokens 8)
echo "adapterhub: $h"
[[ "$h" == "$(cat "$adapters/gpt2_text_double_seq_bn/greedy.txt")" ]]
# A bottleneck run writes AdapterHub's file name and reloads from it.
sed -e 's/^plugin = "lora"$/plugin = "bottleneck"/' -e 's/^targets = .*$/targets = []/' "$out/run.toml" >"$out/bn.toml"
"$tessera" --log-level warn train "$out/bn.toml" --run-dir "$out/bn" >/dev/null
[[ -s "$out/bn/adapter/bottleneck/adapter.safetensors" && ! -e "$out/bn/adapter/bottleneck/adapter_model.safetensors" ]]
"$tessera" eval "$out/bn" | grep -q "reproduces the accuracy recorded at training time"
"$tessera" generate --run "$out/bn" "the film is" --max-new-tokens 4 | grep -q "^the film is"
c=$("$tessera" generate --model "$model" "the film is" --sample --top-k 20 --seed 7)
d=$("$tessera" generate --model "$model" "the film is" --sample --top-k 20 --seed 7)
[[ "$c" == "$d" ]]
# An empty prompt starts from the config's bos_token_id (the tokenizer adds no BOS).
g=$("$tessera" generate --model "$model" "" --max-new-tokens 8)
[[ -n "$g" ]]

# T5 answers a source (no echo of the prompt), the same text twice.
e=$("$tessera" generate --model "$t5" "the film is" --max-new-tokens 6)
f=$("$tessera" generate --model "$t5" "the film is" --max-new-tokens 6)
[[ "$e" == "$f" && "$e" != "the film is"* ]]

# A prompt initialised from text trains, and `generate --run` attaches it the same way (it
# offers the run's tokenizer too) before loading what was trained: the same text twice,
# and not the base model's.
sed -e 's/^plugin = "lora"$/plugin = "prompt_tuning"/' -e 's/^targets = .*$//' "$out/run.toml" >"$out/prompt.toml"
cat >>"$out/prompt.toml" <<TOML
[methods.params]
num_virtual_tokens = 6
prompt_tuning_init = "TEXT"
prompt_tuning_init_text = "a movie review :"
TOML
"$tessera" --log-level warn train "$out/prompt.toml" --run-dir "$out/prompt" >/dev/null
p1=$("$tessera" generate --run "$out/prompt" "the film is" --max-new-tokens 8)
p2=$("$tessera" generate --run "$out/prompt" "the film is" --max-new-tokens 8)
base=$("$tessera" generate --model "$model" "the film is" --max-new-tokens 8)
# One value per flag: the prompt after --disable or --scale stays the prompt, and the run's
# LoRA switched off, or scaled by 0, decodes as the base model.
[[ "$a" != "$base" ]]  # which it does not with the LoRA on
[[ "$("$tessera" generate --run "$out/run" --disable lora "the film is" --max-new-tokens 8)" == "$base" ]]
[[ "$("$tessera" generate --run "$out/run" --scale lora=0 "the film is" --max-new-tokens 8)" == "$base" ]]
[[ "$p1" == "the film is"* && "$p1" == "$p2" && "$p1" != "$base" ]]
echo "through a prompt: $p1"

# Two LoRAs served by one route group: `generate --tag adapter=NAME` decodes as that LoRA
# alone, read from its own folder through --peft; a prompt without the tag is refused.
python3 - "$TESSERA_DATA_DIR/polarity.csv" "$out/tagged.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))[:200]
with open(sys.argv[2], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["adapter"])
    w.writeheader()
    for i, r in enumerate(rows):
        w.writerow({**r, "adapter": "ab"[i % 2]})
PY
sed -e "s|^path = \"\\\${TESSERA_DATA_DIR}/polarity.csv\"|path = \"$out/tagged.csv\"\ntag_columns = [\"adapter\"]|" -e '/^\[\[methods\]\]/,$d' "$out/run.toml" >"$out/routed.toml"
for name in a b; do
  printf '[[methods]]\nplugin = "lora"\nname = "%s"\ntargets = ["c_attn"]\n[methods.params]\ninit_lora_weights = "false"\n' "$name" >>"$out/routed.toml"
done
printf '[[groups]]\nname = "serve"\nkind = "route"\nmembers = ["a", "b"]\ntag = "adapter"\n' >>"$out/routed.toml"
"$tessera" --log-level warn train "$out/routed.toml" --run-dir "$out/routed" >/dev/null
declare -A tagged
for name in a b; do
  tagged[$name]=$("$tessera" generate --run "$out/routed" --tag adapter=$name "the film is" --max-new-tokens 8)
  alone=$("$tessera" generate --model "$model" --peft "$out/routed/adapter/$name" "the film is" --max-new-tokens 8)
  echo "tagged $name: ${tagged[$name]}"
  [[ "${tagged[$name]}" == "the film is"* && "${tagged[$name]}" == "$alone" ]]
done
[[ "${tagged[a]}" != "${tagged[b]}" && "${tagged[a]}" != "$base" ]]  # the two LoRAs (drawn non-zero) do act
set +e
"$tessera" generate --run "$out/routed" "the film is" >"$out/untagged.txt" 2>"$out/err.txt"
rc=$?
set -e
cat "$out/err.txt"
[[ $rc == 1 && ! -s "$out/untagged.txt" ]] && grep -q "reads tag column 'adapter', which this batch does not carry" "$out/err.txt"

# An encoder is not a decoder: refused in one line.
set +e
"$tessera" generate --model "$TESSERA_MODEL_DIR" "hello" 2>"$out/err.txt"
rc=$?
set -e
[[ $rc == 1 ]] && grep -q "is an encoder" "$out/err.txt" && [[ $(wc -l <"$out/err.txt") == 1 ]]
echo "causal-lm train, eval and generate: ok"
