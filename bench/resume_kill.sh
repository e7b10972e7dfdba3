#!/usr/bin/env bash
# Exact resume under repeated kill -9: for each plugin, ROUNDS times, a run of
# tests/cli/resume.sh (MiniLM, polarity, 40 steps, a checkpoint every 4) is killed KILLS
# times at random steps, resumed after each, and must end with the uninterrupted run's
# adapter, metrics and accuracy bit for bit. Prints one line per round; exits 1 at the first
# difference. Also prints what a checkpoint costs: its size and the time a run with
# checkpoint_every = 1 takes against one with none.
#   bash bench/resume_kill.sh [rounds] [kills] [plugins...]   (5, 3, lora dylora adalora child_tuning diff_pruning all)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-5} kills=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
plugins=("$@")
((${#plugins[@]})) || plugins=(lora dylora adalora child_tuning diff_pruning all)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
tessera=$root/build/bin/tessera
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for plugin in "${plugins[@]}"; do
  for ((r = 1; r <= rounds; r++)); do
    bash "$root/tests/cli/resume.sh" "$tessera" "$out/$plugin" "$kills" "$plugin" | grep "killed at" | sed "s/^/round $r: /"
  done
done
# The cost of checkpoints: a LoRA run with one after every step, against none.
sed -e 's/^checkpoint_every = 4/checkpoint_every = 1/' "$out/lora/run.toml" >"$out/every.toml" 2>/dev/null || exit 0
sed -e 's/^checkpoint_every = 4/checkpoint_every = 0/' "$out/lora/run.toml" >"$out/none.toml"
for c in none every; do
  start=$(date +%s.%N)
  "$tessera" --log-level warn train "$out/$c.toml" --run-dir "$out/cost-$c" >/dev/null
  echo "checkpoint_every $([ $c = every ] && echo 1 || echo 0): $(echo "$(date +%s.%N) - $start" | bc) s"
done
du -sh "$(ls -d "$out"/cost-every/checkpoints/step-* | tail -n 1)" | sed 's/^/one checkpoint: /'
