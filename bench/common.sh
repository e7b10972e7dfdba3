# What the bench scripts share, sourced at their top (after `set -euo pipefail`):
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# gives $root (the source tree), a built tree, the bootstrap's environment ($TESSERA_VENV,
# $TESSERA_MODEL_DIR …), its python as $py, and a scratch folder $work removed on exit.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
