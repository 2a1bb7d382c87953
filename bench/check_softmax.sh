#!/usr/bin/env bash
# `einattn check` over every softmax example: bf16 and f16, d = 64, 128 and 256,
# N in {128, 1000, 4096} (causal examples: attention_causal, attention_alibi,
# attention_sliding_window, attention_softcap, gqa; the others are not causal). gqa runs twice: grouped-query
# attention (GROUP = 4: 8 query heads on 2 K/V heads), then multi-query attention
# (GROUP = H = 8: one K/V head). cross_attention reads N queries against 1001 keys (both
# tails ragged); document_mask draws one to five documents per sequence; sink_attention has a
# per-head sink logit, softmax_plus_one softmax1's `+1`, sigmoid_attention no normalization,
# relative_bias a table over p - m in the score, gqa_sink_decoding a sink per query head in
# packed grouped-query decoding, qk_norm pre-kernels before the score,
# gated_attention a post-kernel after it; differential_attention one attention kernel per
# softmax map (halves 64 wide, V d wide) and their difference after them;
# attention_mla runs Q.K at the value
# dim + 64 (192 against 128 at d = 128, 128 against 64 at d = 64; not at d = 256). Prints
# one line per check and a tally; exits non-zero if any check fails.
# Usage: [NS='128 1000'] [DS='64 128 256'] [DTS='bf16 f16'] [LIMIT=seconds] bench/check_softmax.sh [path/to/einattn]
set -uo pipefail
BIN=${1:-target/release/einattn}
source "$(dirname "$0")/check_lib.sh"
# Split tiles must divide N: 1000 = 25 x 40.
tile_for() { if [ "$1" = 1000 ]; then echo 40; else echo 64; fi; }
for n in ${NS:-128 1000 4096}; do
  t=$(tile_for $n)
  for d in ${DS:-64 128 256}; do
    # Latent attention's Q.K is 64 wider than V: 320 at d = 256 is past the kernel's tiles.
    mla=""
    [ "$d" -le 128 ] && mla="attention_mla -D N=$n -D D=$((d + 64)) -D DV=$d -D TILE=$t"
    for dt in ${DTS:-bf16 f16}; do
      check_lines $n $d $dt <<LIST
attention_1pass -D M=$n -D D=$d -D TILE=$t
attention_2pass -D M=$n -D D=$d
attention_3pass -D M=$n -D D=$d
attention_mha -D N=$n -D D=$d -D TILE=$t
attention_causal -D N=$n -D D=$d -D TILE=$t
attention_alibi -D N=$n -D D=$d -D TILE=$t
attention_sliding_window -D N=$n -D D=$d -D TILE=$t
attention_softcap -D N=$n -D D=$d
flash_decoding -D N=$n -D D=$d
gqa_decoding -D N=$n -D D=$d -D H=8 -D GROUP=4
gqa_sink_decoding -D N=$n -D D=$d -D H=8 -D GROUP=4
gqa -D N=$n -D D=$d -D TILE=$t
gqa -D N=$n -D D=$d -D TILE=$t -D H=8 -D GROUP=8
cross_attention -D N=$n -D M=1001 -D D=$d -D TILE=77
document_mask -D N=$n -D D=$d -D TILE=$t -D B=2 -D H=4
sink_attention -D N=$n -D D=$d
sigmoid_attention -D N=$n -D D=$d
relative_bias -D N=$n -D D=$d
qk_norm -D N=$n -D D=$d
gated_attention -D N=$n -D D=$d -D TILE=$t
softmax_plus_one -D N=$n -D D=$d -D TILE=$t
$mla
differential_attention -D N=$n -D D=64 -D DV=$d
LIST
    done
  done
done
check_summary
