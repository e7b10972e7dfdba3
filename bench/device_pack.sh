#!/usr/bin/env bash
# Packs what bench/device_check.sh needs on a machine with a GPU and no network into
# .device/ (git-ignored): the binaries and plugins built here against the same torch wheel
# (2.11.0+cu130 links libtorch_cuda, so one build serves CPU and GPU), the Debian shared
# libraries they link, the test fixtures, the polarity data, and the two real checkpoints'
# configs and tokenizer (their weights are too large to carry: device_check.sh gives the
# same architectures random weights there, which changes no speed).
#   bash bench/device_pack.sh      # then carry .device-pack (.device as one xz archive) to the
#                                  # GPU machine and unpack it there: tar -xJf .device-pack/device.tar.xz
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
bash "$root/scripts/build" >/dev/null
cmake --build "$root/build" --target tessera_tests tessera_bench_forward >/dev/null
pack=$root/.device
rm -rf "$pack"
mkdir -p "$pack"/{lib,data,models/smollm2,build/bin,build/tests}
cp -a "$root"/build/bin/{tessera,tessera_tests,tessera_bench_forward,plugins} "$pack/build/bin/"
cp -a "$root/build/lib" "$pack/build/"
cp -a "$root"/build/tests/{test-plugins,bad-plugins,example-plugins} "$pack/build/tests/"
# The fixtures ctest made (the real decoder's need its weights: left out).
cp -a "$root/build/tests/fixtures" "$pack/build/tests/" && rm -rf "$pack/build/tests/fixtures/real_decoder"
# System libraries outside glibc and the compiler's runtime (spdlog, fmt, toml++, utf8proc, PCRE2).
ldd "$root"/build/bin/tessera_tests "$root"/build/bin/tessera | awk '$3 ~ /^\/lib/ {print $3}' | sort -u |
  grep -Ev '/(libc|libm|libdl|libpthread|librt|libutil|libgcc_s|libstdc\+\+)\.so' | xargs -r cp -L -t "$pack/lib"
cp "$TESSERA_DATA_DIR/polarity.csv" "$pack/data/"
cp "$TESSERA_MODEL_DIR/config.json" "$pack/models/minilm.config.json"
mkdir -p "$pack/models/minilm"
cp "$TESSERA_MODEL_DIR"/{tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$pack/models/minilm/"
cp "$TESSERA_DECODER_DIR"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} "$pack/models/smollm2/"
echo "$root/build" >"$pack/build_dir"  # the absolute paths compiled into the tests point there
# The tree is larger than what may travel; compressed it is a fraction.
mkdir -p "$root/.device-pack"
tar -C "$root" -cf - .device | xz -T2 -6 >"$root/.device-pack/device.tar.xz"
du -sh "$pack" "$root/.device-pack/device.tar.xz"
