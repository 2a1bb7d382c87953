#!/usr/bin/env bash
# The sm_90a softmax kernels with the first key tile peeled and with persistent grids, on
# one H200 in one call. Steps (WHAT, default all):
#   checks      bench/check_softmax.sh on sm_90a (N=1000, d 64/128, bf16/f16): the peeled
#               key loop is in every warp-specialized kernel
#   persistent  `check --grid persistent` of the warp-specialized softmax examples at sizes
#               with more work tiles than the H200 has SMs (each CTA loops over two or more),
#               d 64/128, bf16/f16
#   sweep       bench/softmax_sweep.py: OLD's default (an earlier build, if given), ours
#               (default), ours --grid persistent, beside SDPA's FA2 and cuDNN
#   decode      bench/decode_compare.py (the one-pass merge of split decoding)
#   flex        bench/flex_variants.py on FLEX_CASES, default and --grid persistent
# Results go to $OUT as they come. Usage: OUT=dir [OLD=path/to/older/einattn] [WHAT=...]
#        bench/persistent_device.sh [path/to/einattn]
set -u
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
BIN=${1:-target/release/einattn}
WHAT=${WHAT:-checks persistent sweep decode flex}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/device.txt" 2>&1
date -u >> "$OUT/device.txt"
if [[ $WHAT == *checks* ]]; then
  for d in 64 128; do
    for dt in bf16 f16; do
      CHECK_FLAGS="--target sm_90a" NS=1000 DS=$d DTS=$dt LIMIT=60 timeout 200 bash bench/check_softmax.sh "$BIN" \
        > "$OUT/check_sm90a_d${d}_$dt.txt" 2>&1 &
    done
  done
fi
if [[ $WHAT == *persistent* ]]; then
  for d in 64 128; do
    for dt in bf16 f16; do
      mla=""
      [ "$d" = 128 ] && mla="attention_mla -D N=512 -D B=2 -D H=32 -D D=192 -D DV=128"
      CHECK_FLAGS="--target sm_90a --grid persistent" LIMIT=90 timeout 200 bash -c '
        BIN=$0; source bench/check_lib.sh
        check_lines mixed $1 $2 <<LIST
attention_mha -D N=1000 -D TILE=40 -D B=2 -D H=16 -D D=$1
attention_causal -D N=1000 -D TILE=40 -D B=2 -D H=16 -D D=$1
attention_alibi -D N=512 -D B=2 -D H=32 -D D=$1
attention_sliding_window -D N=512 -D B=2 -D H=32 -D W=96 -D D=$1
attention_softcap -D N=512 -D B=2 -D H=32 -D D=$1
gqa -D N=512 -D B=2 -D H=32 -D GROUP=4 -D D=$1
cross_attention -D N=1000 -D M=1001 -D TILE=77 -D B=2 -D H=16 -D D=$1
sink_attention -D N=512 -D B=2 -D H=32 -D D=$1
softmax_plus_one -D N=512 -D B=2 -D H=32 -D D=$1
sigmoid_attention -D N=512 -D B=2 -D H=32 -D D=$1
relative_bias -D N=512 -D B=2 -D H=32 -D D=$1
qk_norm -D N=512 -D B=2 -D H=32 -D D=$1
gated_attention -D N=512 -D B=2 -D H=32 -D D=$1
differential_attention -D N=512 -D B=2 -D H=32 -D D=64 -D DV=$1
$3
LIST
        check_summary' "$BIN" $d $dt "$mla" > "$OUT/persistent_d${d}_$dt.txt" 2>&1 &
    done
  done
fi
wait
for f in "$OUT"/check_sm90a_d*.txt "$OUT"/persistent_*.txt; do
  [ -f "$f" ] && echo "$(basename "$f"): $(tail -1 "$f")"
done
grep -h -v "PASS\|^checks" "$OUT"/check_sm90a_d*.txt "$OUT"/persistent_*.txt 2>/dev/null | head -20
if [[ $WHAT == *sweep* ]]; then
  old=()
  [ -n "${OLD:-}" ] && old=(old="bin=$OLD")
  timeout "${SWEEP_LIMIT:-200}" python3 bench/softmax_sweep.py "$BIN" "${old[@]}" default= persistent="--grid persistent" 2>&1 \
    | grep -v Warning > "$OUT/sweep_log.txt"
  tail -12 "$OUT/sweep_log.txt"
fi
if [[ $WHAT == *decode* ]]; then
  timeout 100 python3 bench/decode_compare.py "$BIN" default= > "$OUT/decode_log.txt" 2>&1
  tail -8 "$OUT/decode_log.txt"
fi
if [[ $WHAT == *flex* ]]; then
  FLEX_CASES=${FLEX_CASES:-alibi,softcap,window,GQA,cross,differential} OURS_ALT="--grid persistent" \
    timeout "${FLEX_LIMIT:-170}" python3 bench/flex_variants.py "$BIN" 2>&1 | grep -v Warning > "$OUT/flex_log.txt"
  tail -12 "$OUT/flex_log.txt"
fi
date -u >> "$OUT/device.txt"
