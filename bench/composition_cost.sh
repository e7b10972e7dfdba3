#!/usr/bin/env bash
# What the composition engine costs in training: the quickstart's LoRA (six projections, r 8,
# bench/lora_config.sh's batches) alone and as the one member of a stack and of a gated group;
# then two such LoRAs without a group, in a parallel group, averaged (weights 1 and 3) and
# gated. Same data, batch, length, threads and steps for all, ROUNDS alternating rounds
# (bench/train_rounds.sh); prints the median training examples/s and peak RSS, and each as a
# ratio to its baseline.
# padding max_length pads every batch to 64 tokens (the unpadded layout then drops many);
# longest pads each to its longest sentence.
#   bash bench/composition_cost.sh [steps] [max_length|longest] [rounds]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
steps=${1:-20} padding=${2:-max_length} rounds=${3:-3}
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
one=$(bash "$root/bench/lora_config.sh" "$steps" f32 "$padding" "$(nproc)" none lora | sed 's/^plugin = "lora"$/plugin = "lora"\nname = "a"/')
second=$(sed -n '/^\[\[methods\]\]/,$p' <<<"$one" | sed 's/^name = "a"$/name = "b"/')
group() { printf '[[groups]]\nname = "g"\nkind = "%s"\nmembers = [%s]\n%s' "$1" "$2" "${3:-}"; }
printf '%s\n' "$one" >"$work/1-alone.toml"
printf '%s\n%s\n' "$one" "$(group stack '"a"')" >"$work/1-stack.toml"
printf '%s\n%s\n' "$one" "$(group gated '"a"')" >"$work/1-gated.toml"
printf '%s\n%s\n' "$one" "$second" >"$work/2-alone.toml"
printf '%s\n%s\n%s\n' "$one" "$second" "$(group parallel '"a", "b"')" >"$work/2-parallel.toml"
printf '%s\n%s\n%s\n' "$one" "$second" "$(group average '"a", "b"' 'weights = [1.0, 3.0]')" >"$work/2-average.toml"
printf '%s\n%s\n%s\n' "$one" "$second" "$(group gated '"a", "b"')" >"$work/2-gated.toml"
bash "$root/bench/train_rounds.sh" "$work" "$rounds"
PYTHONPATH="$root/bench" $py - "$work" "$rounds" <<'PY'
import sys
from rounds import rounds
r = rounds(sys.argv[1], int(sys.argv[2]))
print("| run | examples/s (median) | runs | peak RSS MiB | examples/s vs its baseline | peak RSS vs its baseline |")
print("|---|---|---|---|---|---|")
for name, v in r.items():
    base = r[name.split("-")[0] + "-alone"]
    print(f"| {name} | {v['median_eps']:.1f} | {' '.join(f'{x:.1f}' for x in v['eps'])} | {v['rss']:.0f} | "
          f"{v['median_eps'] / base['median_eps']:.2f}x | {v['rss'] / base['rss']:.2f}x |")
PY
rm -rf "$work"
