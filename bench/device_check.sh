#!/usr/bin/env bash
# The GPU checks, in one call on a machine with an NVIDIA GPU, its own python3 with torch
# 2.11, transformers and peft, and no network; bench/device_pack.sh packed .device/ here.
#   1. the model, LoRA, loss and training tests with every tensor on the GPU
#      (TESSERA_TEST_DEVICE=cuda; the [minilm] and [real] tests need real weights that
#      are too large to carry and stay on CI's CPU run);
#   2. bench/forward_vs_transformers.sh on the GPU;
#   3. bench/lm_lora_vs_peft.sh on the GPU, GPT-2 small and SmolLM2-135M.
# PARTS picks among "tests parity forward lora" (all by default); TEST_TIMEOUT (s) bounds part 1.
# Logs go to $OUT (or ./device-out). DEVICE=cpu and small sizes make a dry run anywhere:
#   DEVICE=cpu ITERS=1 BATCH=2 LEN=16 STEPS=1 bash bench/device_check.sh
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pack=$root/.device
out=${OUT:-$root/device-out}
parts=" ${PARTS:-tests parity forward lora} "
device=${DEVICE:-cuda} iters=${ITERS:-50} batch=${BATCH:-8} len=${LEN:-128} steps=${STEPS:-30}
mkdir -p "$out"
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
py=${PYTHON:-$(command -v python3)}
export TESSERA_VENV=$(dirname "$(dirname "$py")")
[ -x "$TESSERA_VENV/bin/python" ] || { echo "no $TESSERA_VENV/bin/python"; exit 1; }
torchlib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$pack/lib:$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
built=$(cat "$pack/build_dir")
if [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -s "$pack/build" "$built"; fi
[ -e "$root/build" ] || ln -s "$pack/build" "$root/build"
"$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
nproc

echo "== models: the real checkpoints' architectures with random weights"
models=$(mktemp -d)
"$py" - "$pack/models" "$models" <<'PY' || exit 1
import json, shutil, sys, torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
src, dst = sys.argv[1:]
torch.manual_seed(0)
BertModel(BertConfig(**json.load(open(f"{src}/minilm.config.json")))).save_pretrained(f"{dst}/minilm")
LlamaForCausalLM(LlamaConfig(**json.load(open(f"{src}/smollm2/config.json")))).save_pretrained(f"{dst}/smollm2")
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(f"{src}/minilm/{f}", f"{dst}/minilm/{f}")
for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy(f"{src}/smollm2/{f}", f"{dst}/smollm2/{f}")
PY
# The tests that need only an architecture (refusals, inits, round trips through peft) read
# these; the ones that compare with numbers of the real weights are tagged [minilm] / [real].
export TESSERA_MODEL_DIR=$models/minilm TESSERA_DECODER_DIR=$models/smollm2 TESSERA_DATA_DIR=$pack/data
export TESSERA_TEST_PYTHON=$py
if [[ $parts == *" tests "* ]]; then
echo "== 1. tests on $device"
start=$SECONDS
TESSERA_TEST_DEVICE=$device TESSERA_DATA_DIR=$pack/data timeout "${TEST_TIMEOUT:-0}" "$built/bin/tessera_tests" "~[minilm]~[real]" -r compact --durations yes \
  >"$out/tests.log" 2>&1
echo "rc $? in $((SECONDS - start)) s"
grep -E "failed|^(Passed|Failed|All tests)" "$out/tests.log" | tail -15
fi
if [[ $parts == *" parity "* ]]; then
# The GPU's float32 error against the CPU's float64 truth, under the same rule (docs/testing.md),
# and every parity test still failing on a perturbed weight.
TESSERA_TEST_DEVICE=$device TESSERA_DATA_DIR=$pack/data bash "$root/tests/parity_can_fail.sh" "$built/bin/tessera_tests" "[parity]~[minilm]~[real]" \
  >"$out/parity_can_fail.log" 2>&1
tail -n 1 "$out/parity_can_fail.log"
fi

export TESSERA_BENCH_PREBUILT=1 TESSERA_BENCH_DEVICE=$device

if [[ $parts == *" forward "* ]]; then
echo "== 2. forward on $device"
bash "$root/bench/forward_vs_transformers.sh" "$iters" "$batch" "$len" 2>&1 | tee "$out/forward.log"
fi
[[ $parts == *" lora "* ]] && for which in gpt2 smollm2; do
  echo "== 3. LoRA causal-LM training on $device: $which"
  bash "$root/bench/lm_lora_vs_peft.sh" "$steps" 16 64 $which 2>&1 | tee "$out/lora-$which.log"
done
rm -rf "$models"
