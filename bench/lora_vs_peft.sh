#!/usr/bin/env bash
# LoRA fine-tuning throughput and peak memory, Tessera against transformers + peft on the
# same torch, side by side: same model (all-MiniLM-L6-v2), data (polarity), batch size,
# sequence length (every batch padded to it), LoRA targets and rank, threads and steps.
#   bash bench/lora_vs_peft.sh [steps] [f32|bf16] [max_length|longest] [none|nf4] [lora|lora_fa|dora|adalora|loha|lokr|vera|ia3|prompt_tuning|p_tuning|prefix_tuning|seq_bn|double_seq_bn|par_bn|scaled_par_bn|compacter|compacter++|mam|unipelt]
# dora: LoRA's setting with use_dora on both sides (DoRA, lora_dropout 0.1 as LoRA's).
# loha: LoHa r = 8, alpha 16 on the same six projections on both sides.
# lokr: LoKr r = 8, alpha 16 (PEFT's split of each side, W2 a rank-8 pair) on the same six projections on both sides.
# vera: VeRA r = 256 (PEFT's default) on the same six projections on both sides.
# ia3: (IA)³ with PEFT's default targets for BERT on both sides, in place of LoRA.
# prompt_tuning, p_tuning, prefix_tuning: 20 virtual tokens on both sides (PEFT's defaults otherwise:
# P-tuning's MLP encoder, prefix tuning without its projection); both pool the text's tokens.
# seq_bn … scaled_par_bn: a bottleneck adapter preset, the peer AdapterHub's `adapters`
# (the same torch, in the adapters venv, whose transformers is its pin).
# compacter, compacter++: the compacter plugin's preset against AdapterHub's of that name.
# mam, unipelt: configs/hybrid/<method>.toml against AdapterHub's MAMConfig / UniPELTConfig.
# nf4: QLoRA on both sides — Tessera's [model] quantize = "nf4" with double quantization,
# and the peer's model loaded by bitsandbytes in 4 bits (its CPU path; f32 compute).
# padding max_length: every batch padded to the full length; longest: to its longest
# sentence (both sides see the same consecutive batches of the file, unshuffled).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# batch and len: those of bench/lora_config.sh, which writes Tessera's side of the config.
steps=${1:-30} dtype=${2:-f32} padding=${3:-max_length} quantize=${4:-none} method=${5:-lora} batch=32 len=64 threads=$(nproc)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
work=$(mktemp -d)
bash "$root/bench/lora_config.sh" "$steps" "$dtype" "$padding" "$threads" "$quantize" "$method" >"$work/bench.toml"
py=$TESSERA_VENV/bin/python
peer_py=$py peer="transformers + peft"
[[ $method == *_bn || $method == compacter* || $method == mam || $method == unipelt ]] && peer_py=$TESSERA_ADAPTERS_VENV/bin/python peer="transformers + adapters"
echo "== $peer ($dtype, $threads threads, batch $batch, length $len, padding $padding, base $quantize, $method, $steps timed steps)"
$py "$root/bench/measure.py" "$peer_py" "$root/bench/peer_hf_peft.py" --steps "$steps" --batch-size $batch --max-length $len \
  --threads "$threads" --dtype "$dtype" --padding "$padding" --quantize "$quantize" --method "$method" >"$work/peer.json" 2>"$work/peer.err" || { cat "$work/peer.err"; exit 1; }
echo "== tessera"
$py "$root/bench/measure.py" "$root/build/bin/tessera" --log-level warn train "$work/bench.toml" --run-dir "$work/run" \
  >/dev/null 2>"$work/tessera.err" || { cat "$work/tessera.err"; exit 1; }
$py - "$work" "$peer" <<'PY'
import json, sys, pathlib
w, name = pathlib.Path(sys.argv[1]), sys.argv[2]
last = lambda p: json.loads([l for l in p.read_text().splitlines() if l.startswith("{")][-1])
peer, peer_rss = json.loads((w / "peer.json").read_text()), last(w / "peer.err")["peak_rss_mib"]
ours, ours_rss = json.loads((w / "run" / "result.json").read_text()), last(w / "tessera.err")["peak_rss_mib"]
print(f"{'':24}{'examples/s':>12}{'peak RSS MiB':>14}")
print(f"{name:24}{peer['examples_per_s']:12.1f}{peer_rss:14.0f}")
print(f"{'tessera':24}{ours['examples_per_s']:12.1f}{ours_rss:14.0f}")
print(f"{'ratio (tessera / peer)':24}{ours['examples_per_s'] / peer['examples_per_s']:12.2f}{ours_rss / peer_rss:14.2f}")
PY
rm -rf "$work"
