#!/usr/bin/env bash
# The cost of composing three methods of different kinds — LoRA (q, v, r 8), a Pfeiffer
# adapter (seq_bn) and a prefix (10 tokens) — on the quickstart's model and batches
# (bench/lora_config.sh: batch 32, length 64, every thread): the frozen model, each method
# alone, the three without a group, in a stack group and in a gated group. Runs alternate
# config by config for ROUNDS rounds, so that drift in the machine falls on all alike; each
# config's median seconds per training example t gives
#   expected = t_base + Σ_i (t_i − t_base)      (the three methods' own overheads, summed)
# and each three-method run is printed as t / expected and as examples/s. Peak RSS likewise.
#   bash bench/composition_three.sh [rounds] [steps] [max_length|longest]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-3} steps=${2:-30} padding=${3:-longest}
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
base=$(bash "$root/bench/lora_config.sh" "$steps" f32 "$padding" "$(nproc)" none lora | sed '/^\[\[methods\]\]/,$d')
lora='[[methods]]
plugin = "lora"
name = "lora"
targets = ["attn.q", "attn.v"]
[methods.params]
r = 8
lora_alpha = 16
lora_dropout = 0.1'
adapter='[[methods]]
plugin = "bottleneck"
name = "adapter"
[methods.params]
config = "seq_bn"'
prefix='[[methods]]
plugin = "prefix_tuning"
name = "prefix"
[methods.params]
num_virtual_tokens = 10'
group() { printf '[[groups]]\nname = "g"\nkind = "%s"\nmembers = ["lora", "adapter", "prefix"]\n' "$1"; }
printf '%s\n' "$base" >"$work/0-base.toml"
printf '%s\n%s\n' "$base" "$lora" >"$work/1-lora.toml"
printf '%s\n%s\n' "$base" "$adapter" >"$work/1-adapter.toml"
printf '%s\n%s\n' "$base" "$prefix" >"$work/1-prefix.toml"
printf '%s\n%s\n%s\n%s\n' "$base" "$lora" "$adapter" "$prefix" >"$work/3-none.toml"
printf '%s\n%s\n%s\n%s\n%s\n' "$base" "$lora" "$adapter" "$prefix" "$(group stack)" >"$work/3-stack.toml"
printf '%s\n%s\n%s\n%s\n%s\n' "$base" "$lora" "$adapter" "$prefix" "$(group gated)" >"$work/3-gated.toml"
bash "$root/bench/train_rounds.sh" "$work" "$rounds"
PYTHONPATH="$root/bench" $py - "$work" "$rounds" <<'PY'
import sys
from rounds import rounds
r = rounds(sys.argv[1], int(sys.argv[2]))
t = {n: 1.0 / v["median_eps"] for n, v in r.items()}  # seconds per example
expected = t["0-base"] + sum(t[n] - t["0-base"] for n in ("1-lora", "1-adapter", "1-prefix"))
print("| run | examples/s (median) | runs | peak RSS MiB | time / (base + the parts' overheads) |")
print("|---|---|---|---|---|")
for n, v in r.items():
    ratio = f"{t[n] / expected:.3f}" if n.startswith("3-") else ""
    print(f"| {n} | {v['median_eps']:.1f} | {' '.join(f'{x:.1f}' for x in v['eps'])} | {v['rss']:.0f} | {ratio} |")
PY
rm -rf "$work"
