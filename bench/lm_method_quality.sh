#!/usr/bin/env bash
# A reparameterized method's quality on the real decoder: configs/smollm2-lora.toml's run
# (SmolLM2-135M-Instruct as a causal LM of 800 polarity sentences, 1 epoch, batch 8, 200
# held out) with the method's block from bench/method_toml.sh on all seven projections.
# Prints the run's line: test perplexity, next-token accuracy, trainable share, wall time.
#   bash bench/lm_method_quality.sh <lora|lora_fa|dora|pissa|olora|adalora|dylora|loha|lokr|vera> [lr]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
method=$1 lr=${2:-1e-3}
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Everything before the methods, with the learning rate and run directory replaced; 100 steps.
sed -n '/^\[\[methods\]\]/q;p' "$root/configs/smollm2-lora.toml" |
  sed -e "s|^lr = .*|lr = $lr|" -e "s|^dir = .*|dir = \"$work/run\"|" >"$work/run.toml"
bash "$root/bench/method_toml.sh" "$method" '["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]' 100 >>"$work/run.toml"
echo "== $method on SmolLM2-135M, lr $lr"
"$root/build/bin/tessera" --log-level warn train "$work/run.toml" | tail -n 1
