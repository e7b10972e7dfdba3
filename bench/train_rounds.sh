#!/usr/bin/env bash
# Trains every config WORK/*.toml ROUNDS times, alternating config by config within each round
# (so that drift in the machine falls on all of them alike), into WORK/<name>-<round>/ under
# bench/measure.py, whose lines go to WORK/<name>-<round>.err (its last JSON line holds the
# peak RSS). bench/rounds.py reads the medians back.
#   bash bench/train_rounds.sh WORK ROUNDS
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$1 rounds=$2
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
for i in $(seq "$rounds"); do
  for cfg in "$work"/*.toml; do
    run=$(basename "$cfg" .toml)
    echo "== $run, round $i" >&2
    "$TESSERA_VENV/bin/python" "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$cfg" --run-dir "$work/$run-$i" \
      >/dev/null 2>"$work/$run-$i.err" || { cat "$work/$run-$i.err"; exit 1; }
  done
done
