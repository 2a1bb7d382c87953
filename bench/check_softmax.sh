#!/usr/bin/env bash
# `einattn check` over every softmax example: bf16 and f16, d = 64 and 128,
# N in {128, 1000, 4096} (causal examples: attention_causal, attention_sliding_window,
# attention_softcap; the others are not causal). Prints one line per check and a tally;
# exits non-zero if any check fails.
# Usage: bench/check_softmax.sh [path/to/einattn]
set -uo pipefail
BIN=${1:-target/release/einattn}
pass=0; fail=0
# Split tiles must divide N: 1000 = 25 x 40.
tile_for() { if [ "$1" = 1000 ]; then echo 40; else echo 64; fi; }
for n in 128 1000 4096; do
  t=$(tile_for $n)
  for d in 64 128; do
    for dt in bf16 f16; do
      while read -r ex defs; do
        out=$($BIN check examples/$ex.ein $defs --dtype $dt 2>&1)
        rc=$?
        line=$(echo "$out" | grep -E "^(PASS|FAIL)" || echo "$out" | tail -1)
        if [ $rc = 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); fi
        echo "$ex N=$n d=$d $dt: $line"
      done <<LIST
attention_1pass -D M=$n -D D=$d -D TILE=$t
attention_2pass -D M=$n -D D=$d
attention_3pass -D M=$n -D D=$d
attention_mha -D N=$n -D D=$d -D TILE=$t
attention_causal -D N=$n -D D=$d -D TILE=$t
attention_sliding_window -D N=$n -D D=$d -D TILE=$t
attention_softcap -D N=$n -D D=$d
flash_decoding -D N=$n -D D=$d
LIST
    done
  done
done
echo "checks: $pass passed, $fail failed"
[ $fail = 0 ]
