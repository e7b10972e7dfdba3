#!/usr/bin/env bash
# The hybrid and unified methods of configs/hybrid/ and configs/unified/ on the quickstart task (all-MiniLM-L6-v2, Pang & Lee
# polarity, the same split, budget and seed), each against its parts trained alone with the
# same settings — and UniPELT's three parts also without gates (its group's kind = "parallel",
# the adapter's use_gating off), which isolates what the gates do. Prints test accuracy, trainable share, examples/s and
# peak RSS per run, measured in one run of this script. Compacter, a hybrid plugin rather than
# a composition, runs beside Compacter++ and beside dense bottleneck adapters of its r at the
# same places (Houlsby's, Pfeiffer's), which isolates what the PHM layers do. SparseAdapter runs
# with each pruner at 40%, in the paper's Large-Sparse setting (r = 48 at 50%: the budget of
# r = 24 dense) and beside the dense adapter it prunes (the bottleneck plugin, r = 24).
# AdaMix runs with and without its consistency term, beside one dense adapter at its places.
# ProPETL runs beside its prototype unmasked in every layer (keep = 1) and beside a dense
# adapter of its r in every layer.
#   bash bench/hybrids.sh [mam|unipelt|compacter|sparse_adapter|adamix|propetl ...]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hybrids=("$@")
[[ ${#hybrids[@]} -eq 0 ]] && hybrids=(mam unipelt)
bash "$root/scripts/build" >/dev/null
source "${TESSERA_HOME:-$HOME/.cache/tessera}/env.sh"
py=$TESSERA_VENV/bin/python
work=$(mktemp -d)
# Each variant as a config: the hybrid, each [[methods]] block alone, and the ungated group.
$py - "$root" "$work" "${hybrids[@]}" <<'PY'
import pathlib, re, sys
root, work, names = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
for name in names:
    text = next(p for p in (root / "configs/hybrid" / f"{name}.toml", root / "configs/unified" / f"{name}.toml") if p.exists()).read_text()
    if name == "propetl":
        (work / "propetl.toml").write_text(text)
        (work / "propetl-keep-all.toml").write_text(text.replace("keep = 0.5", "keep = 1.0"))
        dense = text.split("[[methods]]")[0]
        (work / "propetl-dense-r64.toml").write_text(dense + '[[methods]]\nplugin = "bottleneck"\n[methods.params]\nconfig = "seq_bn"\nreduction_factor = 6.0\n')
        continue
    if name == "adamix":
        (work / "adamix.toml").write_text(text)
        (work / "adamix-no-consistency.toml").write_text(text.replace("consistency_weight = 1.0", "consistency_weight = 0.0"))
        dense = text.split("[[methods]]")[0]
        (work / "adamix-dense-r24.toml").write_text(dense + '[[methods]]\nplugin = "bottleneck"\ntargets = ["mlp"]\n[methods.params]\nconfig = "double_seq_bn"\n'
                                                    'reduction_factor = 16.0\nnon_linearity = "gelu"\n')
        continue
    if name == "sparse_adapter":
        for pruner in ("snip", "grasp", "magnitude", "random"):
            (work / f"sparse-{pruner}-40.toml").write_text(text.replace('pruner = "snip"', f'pruner = "{pruner}"'))
        (work / "sparse-large-snip-r48-50.toml").write_text(text.replace("reduction_factor = 16.0", "reduction_factor = 8.0").replace("sparsity = 0.4", "sparsity = 0.5"))
        dense = text.split("[methods.params]")[0].replace('plugin = "sparse_adapter"', 'plugin = "bottleneck"')
        (work / "sparse-dense-r24.toml").write_text(dense + '[methods.params]\nconfig = "seq_bn"\nreduction_factor = 16.0\n')
        continue
    if name == "compacter":
        (work / "compacter.toml").write_text(text)
        (work / "compacter++.toml").write_text(text.replace('config = "compacter"', 'config = "compacter++"'))
        for preset, label in (("double_seq_bn", "houlsby"), ("seq_bn", "pfeiffer")):
            dense = text.split("[methods.params]")[0].replace('plugin = "compacter"', 'plugin = "bottleneck"')
            (work / f"compacter-dense-{label}-r12.toml").write_text(dense + f'[methods.params]\nconfig = "{preset}"\nbottleneck_size = 12\nnon_linearity = "gelu"\n')
        continue
    head, rest = text.split("[[methods]]", 1)
    blocks = ["[[methods]]" + b for b in ("[[methods]]" + rest).split("[[methods]]")[1:]]
    blocks[-1], group = blocks[-1].split("[[groups]]", 1)
    (work / f"{name}.toml").write_text(text)
    for b in blocks:
        part = re.search(r'name = "([^"]+)"', b).group(1)
        (work / f"{name}-{part}.toml").write_text(head + b.replace("use_gating = true", "use_gating = false"))  # the part as it is alone
    if 'kind = "gated"' in group:  # no gates at all: the group's and the adapter's own off
        (work / f"{name}-ungated.toml").write_text(text.replace('kind = "gated"', 'kind = "parallel"').replace("use_gating = true", "use_gating = false"))
PY
bash "$root/bench/train_rounds.sh" "$work" 1
PYTHONPATH="$root/bench" $py - "$work" <<'PY'
import json, pathlib, sys
from rounds import rounds
w = pathlib.Path(sys.argv[1])
print(f"| run | test accuracy | trainable | share of the base | examples/s | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for name, v in rounds(w, 1).items():
    r = json.loads((w / f"{name}-1" / "result.json").read_text())
    share = 100 * r["trainable_parameters"] / r["base_parameters"]
    print(f"| {name} | {100 * r['test_accuracy']:.2f}% | {r['trainable_parameters']} | {share:.2f}% | {v['median_eps']:.1f} | {v['rss']:.0f} |")
PY
rm -rf "$work"
