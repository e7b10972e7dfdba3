#!/usr/bin/env bash
# The parity tests can fail: every test case tagged [parity] is run again with one weight of
# each model it loads scaled by (1 + 1e-3) (TESSERA_TEST_PERTURB, tests/support.h), and each
# must then fail on a parity check — not pass, and not fail for another reason.
#
# usage: parity_can_fail.sh TESSERA_TESTS_BINARY [TAG]   (TAG defaults to [parity]; the
# GPU run leaves out [minilm] and [real] models, as the rest of its suite does)
set -uo pipefail
bin=$1
tag=${2:-[parity]}
mapfile -t cases < <("$bin" --list-test-names-only "$tag" | sed '/^$/d')
((${#cases[@]})) || { echo "no test case matches $tag"; exit 1; }
# Perturbed, case c; extra arguments go to Catch. Catch reads "," in a name as "or": escaped.
# --warn NoTests: a name that matches nothing fails.
perturbed() { TESSERA_TEST_PERTURB=1 "$bin" --warn NoTests "$@" "${c//,/\\,}" 2>&1; }
is_parity_failure() { grep -q 'max |ours - truth|' <<<"$1" && ! grep -q 'due to unexpected exception' <<<"$1"; }
failed=0 caught=0
for c in "${cases[@]}"; do
  # First stopped at its first failed check (--abort), which is most often a parity check; where
  # that first one is another comparison (a gradient, a step's parameters), the whole case runs
  # and must fail a parity check somewhere.
  out=$(perturbed --abort)
  rc=$?
  if ((rc != 0)) && ! is_parity_failure "$out"; then out=$(perturbed); rc=$?; fi
  if ((rc == 0)); then
    echo "NOT CAUGHT: '$c' passes with a weight perturbed by 1e-3"; failed=$((failed + 1))
  elif ! is_parity_failure "$out"; then
    echo "FAILED FOR ANOTHER REASON: '$c'"; echo "$out" | tail -n 20; failed=$((failed + 1))
  else
    worst=$(grep -o 'max |ours - truth| [^,]*, tolerance [^ ]*' <<<"$out" | head -n 1)
    echo "caught: '$c' ($worst)"; caught=$((caught + 1))
  fi
done
echo "$caught of ${#cases[@]} parity test cases fail with a weight perturbed by 1e-3"
((failed == 0))
