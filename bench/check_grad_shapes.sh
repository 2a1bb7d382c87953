#!/usr/bin/env bash
# `einattn check --grad` of the softmax backward kernels in every kernel shape
# bench/softmax_bwd_compare.py times (mma.sync and wgmma, 4 or 8 warps, loop tiles of 32 or
# 64), on the examples whose backward takes them, d = 64 and 128, bf16 and f16.
# Usage: bench/check_grad_shapes.sh [path/to/einattn]   Exits non-zero if any check fails.
set -uo pipefail
BIN=${1:-target/release/einattn}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."
jobs=$(mktemp)
for ex in "attention_1pass -D M=320" "attention_causal -D N=320" "attention_mha -D N=256 -D B=1" \
          "attention_sliding_window -D N=320 -D W=96"; do
  for d in 64 128; do
    for dt in bf16 f16; do
      for flags in "" "--tile m=64" "--mma wgmma" "--mma wgmma --tile m=64" "--mma wgmma --warps 8" \
                   "--mma wgmma --warps 8 --tile m=64"; do
        echo "$ex -D D=$d --dtype $dt $flags" >> "$jobs"
      done
    done
  done
done
run_one() {
  # shellcheck disable=SC2086
  set -- $1
  name=$1; shift
  out=$($BIN check --grad examples/$name.ein "$@" --seed 5 2>&1)
  rc=$?
  line=$(echo "$out" | grep -E "^(kernel|PASS|FAIL)" | tr "\n" " ")
  [ -z "$line" ] && line=$(echo "$out" | tail -1)
  if [ $rc = 0 ]; then echo "ok   $name $*: $line"; else echo "BAD  $name $* (rc $rc): $line"; fi
}
export -f run_one; export BIN
results=$(xargs -P 8 -I{} bash -c 'run_one "$@"' _ {} < "$jobs" | sort)
rm -f "$jobs"
echo "$results"
pass=$(echo "$results" | grep -c '^ok' || true); fail=$(echo "$results" | grep -c '^BAD' || true)
echo "check --grad shapes: $pass passed, $fail failed"
[ "$fail" = 0 ]
