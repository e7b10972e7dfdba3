#!/usr/bin/env bash
# Trains every config WORK/*.toml into WORK/<name>/ under bench/measure.py, one after another;
# measure.py's lines go to WORK/<name>.err (its last JSON line holds the peak RSS). The benches
# that compare several configs in one run share this.
#   bash bench/train_each.sh WORK
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$1
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
for cfg in "$work"/*.toml; do
  run=$(basename "$cfg" .toml)
  echo "== $run" >&2
  "$TESSERA_VENV/bin/python" "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$cfg" --run-dir "$work/$run" \
    >/dev/null 2>"$work/$run.err" || { cat "$work/$run.err"; exit 1; }
done
