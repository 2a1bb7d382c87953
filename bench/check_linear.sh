#!/usr/bin/env bash
# `einattn check` over the linear-attention examples (per-head decay: lightning,
# lightning_naive; no decay: linear_causal; non-causal: linear_attention; data-dependent gate:
# gated_linear): bf16 and f16, d = e = 64 and 128,
# N in {64, 1000, 8192}. Exits non-zero if any check fails.
# Usage: bench/check_linear.sh [path/to/einattn]
set -uo pipefail
BIN=${1:-target/release/einattn}
source "$(dirname "$0")/check_lib.sh"
for n in 64 1000 8192; do
  # lightning.ein splits N into blocks that must divide it: 1000 = 125 x 8.
  blk=64; if [ $n = 1000 ]; then blk=8; fi
  for d in 64 128; do
    for dt in bf16 f16; do
      check_lines $n $d $dt <<LIST
lightning -D N=$n -D D=$d -D BLOCK=$blk
lightning_naive -D N=$n -D D=$d
linear_causal -D N=$n -D D=$d
linear_attention -D N=$n -D D=$d
gated_linear -D N=$n -D D=$d -D BLOCK=$blk
LIST
    done
  done
done
check_summary
