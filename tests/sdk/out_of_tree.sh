#!/usr/bin/env bash
# Installs the SDK from the build tree, builds the plugin template and the worked
# examples (sdk/examples) out of tree against it with find_package(TesseraSDK), and
# checks that the host loads every one.
set -euo pipefail
build=$1 template=$2 tessera=$3
work=$build/out-of-tree
rm -rf "$work" && mkdir -p "$work"
rm -f "$build"/install_manifest*.txt
# The SDK's own install script, as docs/writing-a-plugin.md says: the SDK alone, and no
# install_manifest.txt left in the build tree.
cmake -DCMAKE_INSTALL_PREFIX="$work/sdk" -P "$build/sdk/cmake_install.cmake" >/dev/null
[[ -z "$(ls "$build"/install_manifest*.txt 2>/dev/null)" ]]
cmake -S "$template" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/sdk" \
  -DCMAKE_CXX_COMPILER_LAUNCHER=ccache >/dev/null
cmake --build "$work/build" >/dev/null
"$tessera" --plugin-dir "$work/build" plugins | tee "$work/plugins.txt"
grep -q "^my-method 0.1.0" "$work/plugins.txt"
! grep -q "refused" "$work/plugins.txt"
cmake -S "$template/../examples" -B "$work/examples" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/sdk" \
  -DCMAKE_CXX_COMPILER_LAUNCHER=ccache >/dev/null
cmake --build "$work/examples" >/dev/null
"$tessera" --plugin-dir "$work/examples" plugins | tee "$work/examples.txt"
for id in example-bias-delta example-token-adapter example-soft-prompt example-attention-prefix example-layer-mix; do grep -q "^$id 0.1.0" "$work/examples.txt"; done
! grep -q "refused" "$work/examples.txt"
echo "out-of-tree plugins: ok"
