#!/usr/bin/env bash
# LoRA fine-tuning, this tree against another revision of Tessera (default: 83f5804, the
# last commit on SDK 1), same config as bench/lora_vs_peft.sh, runs alternating A B A B
# so that drift in the machine falls on both sides alike. Prints each side's median
# examples/s and peak RSS and their ratio (this tree / the other).
#   bash bench/ab_lora.sh [revision] [rounds] [steps]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rev=${1:-83f5804} rounds=${2:-3} steps=${3:-30}
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
other=$root/build-ab/$rev
if [ ! -x "$other/build/bin/tessera" ]; then
  rm -rf "$other" && mkdir -p "$other"
  git -C "$root" archive "$rev" | tar -x -C "$other"
  (cd "$other" && export CCACHE_BASEDIR="$other" CCACHE_NOHASHDIR=true && cmake --preset default >/dev/null &&
    cmake --build --preset default --target tessera lora >/dev/null)
fi
work=$(mktemp -d)
bash "$root/bench/lora_config.sh" "$steps" f32 max_length "$(nproc)" >"$work/bench.toml"
py=$TESSERA_VENV/bin/python
for i in $(seq "$rounds"); do
  for side in other this; do
    bin=$root/build/bin/tessera
    [ "$side" = other ] && bin=$other/build/bin/tessera
    $py "$root/bench/measure.py" "$bin" --log-level warn train "$work/bench.toml" --run-dir "$work/$side-$i" \
      >/dev/null 2>"$work/$side-$i.err" || { cat "$work/$side-$i.err"; exit 1; }
  done
done
$py - "$work" "$rounds" "$rev" <<'PY'
import json, statistics, sys, pathlib
w, rounds, rev = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
last = lambda p: json.loads([l for l in p.read_text().splitlines() if l.startswith("{")][-1])
def side(s):
    eps = [json.loads((w / f"{s}-{i}" / "result.json").read_text())["examples_per_s"] for i in range(1, rounds + 1)]
    rss = [last(w / f"{s}-{i}.err")["peak_rss_mib"] for i in range(1, rounds + 1)]
    acc = {json.loads((w / f"{s}-{i}" / "result.json").read_text())["test_accuracy"] for i in range(1, rounds + 1)}
    return statistics.median(eps), statistics.median(rss), eps, acc
o, t = side("other"), side("this")
print(f"{'':22}{'examples/s':>12}{'peak RSS MiB':>14}   runs (examples/s)   test accuracy")
print(f"{rev:22}{o[0]:12.1f}{o[1]:14.0f}   {' '.join(f'{x:.1f}' for x in o[2])}   {sorted(o[3])}")
print(f"{'this tree':22}{t[0]:12.1f}{t[1]:14.0f}   {' '.join(f'{x:.1f}' for x in t[2])}   {sorted(t[3])}")
print(f"{'ratio (this / other)':22}{t[0] / o[0]:12.3f}{t[1] / o[1]:14.3f}")
PY
rm -rf "$work"
