#!/usr/bin/env bash
# The LoRA training config the LoRA benchmarks share (all-MiniLM-L6-v2 on polarity, batch
# 32, length 64, rank 8 on every linear site of each layer), printed to stdout:
#   bash bench/lora_config.sh <steps> <f32|bf16> <max_length|longest> <threads> [none|nf4] [lora|lora_fa|dora|adalora|dylora|loha|lokr|vera|ia3|prompt_tuning|p_tuning|prefix_tuning|lst|seq_bn|double_seq_bn|par_bn|scaled_par_bn|compacter|compacter++|mam|unipelt]
# mam, unipelt: the methods and group of configs/hybrid/<method>.toml.
# Three steps more than timed: the trainer times from the fourth. nf4: QLoRA (the base's
# linear weights in NF4 with double quantization).
set -euo pipefail
steps=$1 dtype=$2 padding=$3 threads=$4 quantize=${5:-none} method=${6:-lora}
cat <<TOML
[model]
path = "\${TESSERA_MODEL_DIR}"
dtype = "$dtype"
quantize = "$quantize"
double_quant = $([[ $quantize == none ]] && echo false || echo true)
[data]
path = "\${TESSERA_DATA_DIR}/polarity.csv"
max_length = 64
padding = "$padding"
[train]
epochs = 1
batch_size = 32
threads = $threads
max_steps = $((steps + 3))
shuffle = false
$(if [[ $method == ia3 ]]; then cat <<IA3
[[methods]]
plugin = "ia3"
targets = []
IA3
elif [[ $method == prompt_tuning || $method == p_tuning || $method == prefix_tuning ]]; then cat <<PROMPT
[[methods]]
plugin = "$method"
[methods.params]
num_virtual_tokens = 20
PROMPT
elif [[ $method == lst ]]; then cat <<LST
[[methods]]
plugin = "lst"
[methods.params]
reduction_factor = 8
LST
elif [[ $method == mam || $method == unipelt ]]; then sed -n '/^\[\[methods\]\]/,$p' "$(dirname "${BASH_SOURCE[0]}")/../configs/hybrid/$method.toml"
elif [[ $method == compacter* ]]; then cat <<PHM
[[methods]]
plugin = "compacter"
[methods.params]
config = "$method"
PHM
elif [[ $method == *_bn ]]; then cat <<BN
[[methods]]
plugin = "bottleneck"
[methods.params]
config = "$method"
BN
else bash "$(dirname "${BASH_SOURCE[0]}")/method_toml.sh" "$method" '["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]' $((steps + 3))
fi)
TOML
