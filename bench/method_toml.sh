#!/usr/bin/env bash
# The [[methods]] block of a reparameterized method the benchmarks train, printed to stdout:
#   bash bench/method_toml.sh <lora|lora_fa|dora|pissa|olora|adalora|dylora|loha|lokr|vera> '<targets as a TOML array>' <total steps>
# Rank 8 (VeRA: 256, its shared matrices' rank), alpha 2r; AdaLoRA 12 → 8 with its budget
# phase over the first fifth of the steps. bench/peer_methods.py builds the same for peft.
set -euo pipefail
method=$1 targets=$2 total=$3
echo "[[methods]]"
case $method in
  lora | lora_fa | dora | pissa | olora) echo 'plugin = "lora"' ;;
  *) echo "plugin = \"$method\"" ;;
esac
echo "targets = $targets"
echo "[methods.params]"
case $method in
  adalora) printf 'init_r = 12\ntarget_r = 8\nlora_alpha = 32\ntinit = %d\ntfinal = %d\north_reg_weight = 0.1\n' $((total / 10)) $((total / 5)) ;;
  loha | lokr) printf 'r = 8\nalpha = 16\n' ;;
  dylora) printf 'r = 8\nalpha = 16\ndropout = 0.1\n' ;;
  vera) printf 'r = 256\n' ;;
  lora | lora_fa | dora | pissa | olora)
    printf 'r = 8\nlora_alpha = 16\nlora_dropout = 0.1\n'
    if [[ $method == pissa || $method == olora ]]; then echo "init_lora_weights = \"$method\""; fi
    if [[ $method == dora ]]; then echo "use_dora = true"; fi
    if [[ $method == lora_fa ]]; then echo "lora_fa = true"; fi
    ;;
  *) echo "method_toml.sh: no block for '$method'" >&2; exit 1 ;;
esac
