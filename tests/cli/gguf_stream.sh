#!/usr/bin/env bash
# A GGUF file kept as its blocks loads streamed: `tessera generate --quantize gguf` never holds
# the layers' weights dense, so its peak RSS stays well under the same file loaded dense
# (measured 0.65x here: docs/benchmarks.md), and both generate the same greedy token. A bad
# --quantize is refused by the option's name.
#
# usage: gguf_stream.sh TESSERA OUT_DIR PYTHON MEASURE_PY
set -euo pipefail
tessera=$1 out=$2 py=$3 measure=$4
rm -rf "$out" && mkdir -p "$out"
peak() {  # name, then generate's options
  local name=$1
  shift
  "$py" "$measure" "$tessera" --log-level warn generate --model "$TESSERA_DECODER_GGUF" --max-new-tokens 1 "$@" "the film is" >"$out/$name.out" 2>"$out/$name.rss"
  "$py" -c 'import json, sys; print(int(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["peak_rss_mib"]))' "$out/$name.rss"
}
dense=$(peak dense --quantize none)
blocks=$(peak blocks --quantize gguf)
echo "peak RSS: dense $dense MiB, streamed blocks $blocks MiB"
# The layers' f32 weights are ~430 MB; kept as Q4_1 blocks they are ~70 MB.
((blocks * 100 < dense * 80)) || { echo "the streamed load is not lighter than the dense one"; exit 1; }
cmp "$out/dense.out" "$out/blocks.out"
if "$tessera" generate --model "$TESSERA_DECODER_GGUF" --quantize q4 "x" 2>"$out/bad.err"; then exit 1; fi
grep -q -- "--quantize" "$out/bad.err"
echo "gguf_stream: the blocks load at $blocks MiB against $dense MiB dense"
