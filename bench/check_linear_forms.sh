#!/usr/bin/env bash
# `einattn check` over the linear forms of issue 14 (decays in any spelling, feature maps,
# their pre-kernels launched before the linear kernel): linear_feature_map and the cascades
# of tests/filetests/linear_forms, bf16 and f16, d = e = 64 and 128, sm_90a and sm_80,
# N in {1000, 8192}, each strategy. Exits non-zero if any check fails.
# Usage: bench/check_linear_forms.sh [path/to/einattn]
set -uo pipefail
BIN=${1:-target/release/einattn}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."
pass=0; fail=0
F=tests/filetests/linear_forms
for n in 1000 8192; do
  blk=64; if [ $n = 1000 ]; then blk=8; fi
  for d in 64 128; do
    for t in sm_90a sm_80; do
      for dt in bf16 f16; do
        while IFS='|' read -r file strategies defs; do
          for s in $strategies; do
            # shellcheck disable=SC2086
            out=$($BIN check $file -D N=$n -D D=$d $defs --target $t --dtype $dt --strategy $s --seed 13 2>&1)
            rc=$?
            line=$(echo "$out" | grep -E "^(PASS|FAIL)" || echo "$out" | tail -1)
            if [ $rc = 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); fi
            echo "$(basename $file .ein) N=$n d=$d $t $dt $s: $line"
          done
        done <<LIST
examples/linear_feature_map.ein|single chunked lookback|
$F/decay_gamma.ein|single chunked lookback|
$F/decay_distance_first.ein|single|
$F/decay_head_slopes.ein|single chunked lookback|-D H=8
$F/decay_scalar.ein|single chunked lookback|
$F/decay_gamma_chunked.ein|single chunked lookback|-D BLOCK=$blk
$F/feature_map_inline.ein|single|
$F/feature_map_decay.ein|single chunked lookback|-D B=2
$F/feature_map_noncausal.ein|single|
LIST
      done
    done
  done
done
echo "checks: $pass passed, $fail failed"
[ $fail = 0 ]
