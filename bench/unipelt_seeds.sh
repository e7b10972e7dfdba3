#!/usr/bin/env bash
# UniPELT on the real SmolLM2 over seeds: the matrix's one-epoch causal-LM run
# (configs/assess/smollm2.toml's base) of configs/hybrid/unipelt.toml — with its prefix MLP's
# input table as wide as the model (AdapterHub's, the config's) and as the key/value heads
# (peft's width, embedding_width = "kv") — beside AdapterHub's UniPELTConfig run by
# `tessera assess --peers` on the same batches, one seed at a time. A seed draws the
# initial values and the batch order on both sides; each library draws its own values.
#
#   bench/unipelt_seeds.sh 1 2        # the seeds (default: 42 7)
#
# Prints one row per seed and the mean and sample standard deviation of the test perplexity.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(42 7)
sed 's/^embedding_width = "hidden".*/embedding_width = "kv"/' "$root/configs/hybrid/unipelt.toml" >"$work/unipelt_kv.toml"
grep -q '^embedding_width = "kv"' "$work/unipelt_kv.toml"
matrix() {  # name, seeds (TOML list), setup name, setup config
  cat >"$work/$1.toml" <<EOF
base = "$root/configs/smollm2-lora.toml"
seeds = $2
out = "$work/$1"
[[setups]]
name = "$3"
config = "$4"
EOF
}
assess() {  # matrix name, assess options…; a failed row shows its log (the scratch folder goes on exit)
  "$root/build/bin/tessera" assess "${@:2}" "$work/$1.toml" >"$work/$1.log" 2>&1 || { tail -n 20 "$work/$1.log" >&2; exit 1; }
}
list=$(IFS=,; echo "[${seeds[*]}]")
for s in "${seeds[@]}"; do  # one matrix per seed: --peers runs the peer of a setup's first seed
  matrix "hidden-$s" "[$s]" unipelt "$root/configs/hybrid/unipelt.toml"
  assess "hidden-$s" --peers
done
matrix kv "$list" unipelt_kv "$work/unipelt_kv.toml"
assess kv
"$py" - "$work" "${seeds[@]}" <<'EOF'
import json, pathlib, statistics, sys
work, seeds = pathlib.Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
def ours(folder, seed):
    runs = json.loads((work / folder / "results.json").read_text())["runs"]
    return next(r["result"]["test_perplexity"] for r in runs if r["seed"] == seed)
def peer(seed):
    p = json.loads((work / f"hidden-{seed}" / "peers.json").read_text())["unipelt"]
    if "error" in p:
        sys.exit(f"seed {seed}: the peer failed: {p['error']}")
    return p["test_perplexity"]
rows = [(s, ours(f"hidden-{s}", s), ours("kv", s), peer(s)) for s in seeds]
print("| seed | Tessera, AdapterHub's width | Tessera, peft's width | AdapterHub |\n|---|---:|---:|---:|")
for s, h, k, a in rows:
    print(f"| {s} | {h:.2f} | {k:.2f} | {a:.2f} |")
if len(rows) > 1:
    cols = list(zip(*rows))[1:]
    print("| mean ± sd | " + " | ".join(f"{statistics.mean(c):.2f} ± {statistics.stdev(c):.2f}" for c in cols) + " |")
EOF
