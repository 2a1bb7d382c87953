#!/usr/bin/env bash
# `einattn check --grad` over every example that `einattn grad` differentiates: the backward
# kernels on a forward's values against the f64 interpreter of the backward cascade, bf16 and
# f16, head dims 64 and 128, at sizes the interpreter finishes in seconds. Checks run
# concurrently (the interpreter is single-threaded; the GPU work is small).
# Usage: bench/check_grad.sh [path/to/einattn] [target]   Exits non-zero if any check fails.
# GRAD_ONLY="name ..." limits the run to those examples (e.g. the linear ones).
set -uo pipefail
BIN=${1:-target/release/einattn}
TARGET=${2:-sm_90a}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."
jobs=$(mktemp)
# example, sizes (the sequence at a size the f64 interpreter finishes quickly)
# example | sizes (the sequence at a size the f64 interpreter finishes quickly) | head-dim sizes
while IFS='|' read -r name sizes dims; do
  if [ -n "${GRAD_ONLY:-}" ] && [[ " $GRAD_ONLY " != *" $name "* ]]; then continue; fi
  for d in 64 128; do
    for dt in bf16 f16; do
      defs="$sizes"
      for x in $dims; do defs="$defs -D $x=$d"; done
      echo "$name|$defs|$dt" >> "$jobs"
    done
  done
done <<LIST
attention_1pass|-D M=256|D
attention_2pass|-D M=256|D
attention_3pass|-D M=256|D
attention_causal|-D N=256|D
attention_mha|-D N=256 -D B=1|D
attention_sliding_window|-D N=256 -D W=96|D
attention_softcap|-D N=256|D
attention_mla|-D N=256 -D D=192|DV
document_mask|-D N=256|D
gqa|-D N=128|D
sigmoid_attention|-D N=256|D
sink_attention|-D N=256|D
relative_bias|-D N=256|D
qk_norm|-D N=256|D
differential_attention|-D N=256|D
flash_decoding|-D N=1024 -D H=2|D
linear_attention|-D N=256|D
linear_causal|-D N=256|D
linear_feature_map|-D N=256|D
lightning_naive|-D N=256|D
lightning|-D N=256 -D BLOCK=64|D
gated_linear|-D N=256 -D BLOCK=64|D
gla|-D T=64|DK DV
delta_rule|-D T=64|DK DV
delta_rule_chunked|-D N=64 -D CHUNK=16|DK DV
LIST
run_one() {
  IFS='|' read -r name defs dt <<< "$1"
  # shellcheck disable=SC2086
  out=$(timeout "${LIMIT:-120}" $BIN check --grad examples/$name.ein $defs --dtype $dt --target $TARGET --seed 7 2>&1)
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
