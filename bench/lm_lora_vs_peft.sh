#!/usr/bin/env bash
# LoRA causal-LM fine-tuning throughput and peak memory, Tessera against transformers +
# peft on the same torch, side by side: the same checkpoint, tokenizer, consecutive
# batches (each padded to its longest text), LoRA r = 8, threads and steps.
#   bash bench/lm_lora_vs_peft.sh [steps] [batch] [max_length] [gpt2|smollm2] [lora|lora_fa|dora|adalora|loha|lokr|vera] [none|nf4|qlora]
# nf4: both bases in 4-bit NF4 with double quantization (peft: bitsandbytes and
#   prepare_model_for_kbit_training); qlora: that and gradient checkpointing on both sides.
# The method's settings: bench/method_toml.sh (Tessera) and bench/peer_methods.py (peft).
# gpt2: GPT-2 small at its real size with random weights made by transformers and a
#   byte-level BPE trained on the polarity sentences; LoRA on c_attn, c_proj, c_fc.
# smollm2: the real SmolLM2-135M-Instruct (LLaMA architecture) with its own tokenizer;
#   LoRA on q, k, v, o, gate, up, down.
# TESSERA_BENCH_DEVICE=cuda trains both on the GPU and adds their peak GPU memory
# (bench/device_check.sh, with TESSERA_BENCH_PREBUILT=1 as in forward_vs_transformers.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
steps=${1:-10} batch=${2:-16} len=${3:-64} which=${4:-gpt2} method=${5:-lora} base=${6:-none} threads=$(nproc) device=${TESSERA_BENCH_DEVICE:-cpu}
quantize=none ckpt=false peer_base=()
if [ "$base" != none ]; then quantize=nf4 peer_base=(--quantize nf4); fi
if [ "$base" = qlora ]; then ckpt=true peer_base+=(--gradient-checkpointing); fi
if [ -z "${TESSERA_BENCH_PREBUILT:-}" ]; then
  bash "$root/scripts/build" >/dev/null
  source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
fi
[ "$device" = cpu ] || export TESSERA_BENCH_GPU=1
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$which" = smollm2 ]; then
  model=$TESSERA_DECODER_DIR
  ours='["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]'
  peer=(--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)
else
  model=$work/gpt2-small
  ours='["attn.qkv", "attn.o", "mlp.up", "mlp.down"]'
  peer=(--targets c_attn,c_proj,c_fc --fan-in-fan-out)
$py - "$work/gpt2-small" "$TESSERA_DATA_DIR/polarity.csv" <<'PY'
import csv, sys, torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel
out, data = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
t = Tokenizer(models.BPE())
t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
corpus = [r["text"] for r in csv.DictReader(open(data, newline="", encoding="utf-8"))]
t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=50257, special_tokens=["<|endoftext|>"], show_progress=False,
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
t.save(f"{out}/tokenizer.json")
PY
fi
cat >"$work/bench.toml" <<TOML
[model]
path = "$model"
device = "$device"
quantize = "$quantize"
double_quant = $([[ $quantize == none ]] && echo false || echo true)
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
max_length = $len
test_fraction = 0.02
[task]
kind = "causal-lm"
[train]
epochs = 1
batch_size = $batch
eval_batch_size = $batch
threads = $threads
max_steps = $((steps + 3))
shuffle = false
lr = 1e-3
gradient_checkpointing = $ckpt
$(bash "$root/bench/method_toml.sh" "$method" "$ours" $((steps + 3)))
TOML
echo "== $method: transformers + peft ($which, $device, $threads threads, batch $batch, length ≤ $len, base $base, $steps timed steps)"
$py "$root/bench/measure.py" $py "$root/bench/peer_lm_peft.py" --model "$model" "${peer[@]}" --data "$TESSERA_DATA_DIR/polarity.csv" \
  --steps "$steps" --batch-size $batch --max-length $len --threads "$threads" --device "$device" --method "$method" "${peer_base[@]}" >"$work/peer.json" 2>"$work/peer.err" \
  || { cat "$work/peer.err"; exit 1; }
echo "== tessera"
$py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$work/bench.toml" --run-dir "$work/run" \
  >/dev/null 2>"$work/tessera.err" || { cat "$work/tessera.err"; exit 1; }
$py - "$work" <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
last = lambda p: json.loads([l for l in p.read_text().splitlines() if l.startswith("{")][-1])
peer, peer_rss = last(w / "peer.json"), last(w / "peer.err")["peak_rss_mib"]
ours, ours_rss = json.loads((w / "run" / "result.json").read_text()), last(w / "tessera.err")["peak_rss_mib"]
peer_gpu, ours_gpu = last(w / "peer.err").get("peak_gpu_mib"), last(w / "tessera.err").get("peak_gpu_mib")
gpu = lambda v: f"{v:14.0f}" if peer_gpu else ""
steps = [json.loads(l) for l in (w / "run" / "metrics.jsonl").read_text().splitlines() if '"step"' in l and '"lr"' in l]
print(f"{'':24}{'examples/s':>12}{'peak RSS MiB':>14}{'last loss':>12}" + (f"{'peak GPU MiB':>14}" if peer_gpu else ""))
print(f"{'transformers + peft':24}{peer['examples_per_s']:12.2f}{peer_rss:14.0f}{peer['loss']:12.4f}" + gpu(peer_gpu))
print(f"{'tessera':24}{ours['examples_per_s']:12.2f}{ours_rss:14.0f}{steps[-1]['loss']:12.4f}" + gpu(ours_gpu))
print(f"{'ratio (tessera / peer)':24}{ours['examples_per_s'] / peer['examples_per_s']:12.2f}{ours_rss / peer_rss:14.2f}{'':12}"
      + (f"{ours_gpu / peer_gpu:14.2f}" if peer_gpu else ""))
PY
