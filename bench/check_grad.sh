#!/usr/bin/env bash
# `einattn check --grad` over every example that `einattn grad` differentiates: the backward
# kernels on a forward's values against the f64 interpreter of the backward cascade, bf16 and
# f16, head dims 64 and 128, at sizes the interpreter finishes in seconds. Checks run
# concurrently (the interpreter is single-threaded; the GPU work is small).
# Usage: bench/check_grad.sh [path/to/einattn] [target]   Exits non-zero if any check fails.
set -uo pipefail
BIN=${1:-target/release/einattn}
TARGET=${2:-sm_90a}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."
jobs=$(mktemp)
# example, sizes (the sequence at a size the f64 interpreter finishes quickly)
while read -r name sizes; do
  for d in 64 128; do
    for dt in bf16 f16; do
      echo "$name|$sizes -D D=$d|$dt" >> "$jobs"
    done
  done
done <<LIST
attention_1pass -D M=256
attention_2pass -D M=256
attention_3pass -D M=256
attention_causal -D N=256
attention_mha -D N=256 -D B=1
attention_sliding_window -D N=256 -D W=96
attention_softcap -D N=256
document_mask -D N=256
gqa -D N=128
sigmoid_attention -D N=256
sink_attention -D N=256
relative_bias -D N=256
qk_norm -D N=256
differential_attention -D N=256
flash_decoding -D N=1024 -D H=2
linear_attention -D N=256
linear_causal -D N=256
linear_feature_map -D N=256
lightning_naive -D N=256
LIST
run_one() {
  IFS='|' read -r name defs dt <<< "$1"
  # shellcheck disable=SC2086
  out=$($BIN check --grad examples/$name.ein $defs --dtype $dt --target $TARGET --seed 7 2>&1)
  rc=$?
  line=$(echo "$out" | grep -E "ref\|\|" | tr "\n" " ")
  [ -z "$line" ] && line=$(echo "$out" | tail -1)
  if [ $rc = 0 ]; then echo "ok   $name $defs $dt: $line"; else echo "BAD  $name $defs $dt (rc $rc): $line"; fi
}
export -f run_one; export BIN TARGET
results=$(xargs -P 8 -I{} bash -c 'run_one "$@"' _ {} < "$jobs" | sort)
rm -f "$jobs"
echo "$results"
pass=$(echo "$results" | grep -c '^ok' || true); fail=$(echo "$results" | grep -c '^BAD' || true)
echo "check --grad ($TARGET): $pass passed, $fail failed"
[ "$fail" = 0 ]
