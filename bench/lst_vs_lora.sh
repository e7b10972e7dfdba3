#!/usr/bin/env bash
# LST's reason to exist, measured: training throughput and peak memory of ladder side-tuning
# (r = 8) against LoRA (r = 8 on every linear site of each layer), both in Tessera, side by
# side: same model (all-MiniLM-L6-v2), data (polarity), batch, length, threads and steps.
# No library has LST to run as a peer; LoRA is the method it is measured against in its paper.
#   bash bench/lst_vs_lora.sh [steps] [f32|bf16] [max_length|longest] [batch]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
steps=${1:-30} dtype=${2:-f32} padding=${3:-max_length} batch=${4:-32} threads=$(nproc)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
work=$(mktemp -d)
py=$TESSERA_VENV/bin/python
for method in lora lst; do
  bash "$root/bench/lora_config.sh" "$steps" "$dtype" "$padding" "$threads" none "$method" | sed "s/^batch_size = 32$/batch_size = $batch/" >"$work/$method.toml"
  echo "== tessera, $method ($dtype, $threads threads, batch $batch, length 64, padding $padding, $steps timed steps)"
  $py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$work/$method.toml" --run-dir "$work/$method" \
    >/dev/null 2>"$work/$method.err" || { cat "$work/$method.err"; exit 1; }
done
$py - "$work" <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
last = lambda p: json.loads([l for l in p.read_text().splitlines() if l.startswith("{")][-1])
rows = {m: (json.loads((w / m / "result.json").read_text()), last(w / f"{m}.err")["peak_rss_mib"]) for m in ("lora", "lst")}
print(f"{'':24}{'examples/s':>12}{'peak RSS MiB':>14}{'trainable':>12}")
for m, (r, rss) in rows.items():
    print(f"{m:24}{r['examples_per_s']:12.1f}{rss:14.0f}{r.get('trainable_parameters', 0):12d}")
(lora, lora_rss), (lst, lst_rss) = rows["lora"], rows["lst"]
print(f"{'ratio (lst / lora)':24}{lst['examples_per_s'] / lora['examples_per_s']:12.2f}{lst_rss / lora_rss:14.2f}")
PY
rm -rf "$work"
