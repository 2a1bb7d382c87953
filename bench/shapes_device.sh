#!/usr/bin/env bash
# The sm_90a softmax kernels built without a GPU on 2026-12-05 (wide key tiles, lazy
# rescaling, the store by the copy engine, P through shared memory, the pinned wait of the
# deferred P V, alternating persistent rounds) on one H200. Steps (WHAT, default all; run
# each sweep as its own device call, 5-8 minutes each):
#   checks     bench/check_softmax.sh on sm_90a (N=1000, bf16/f16): the defaults (the
#              copy-engine producer keeps 24 registers, d=64 takes 192 x 128 tiles with
#              three consumer warpgroups, Q's descriptors hoisted), FlashAttention-3's key
#              tiles (176 at d=128, 192 at d=64) with `--rescale lazy --pv-wait pinned`,
#              `--rescale lazy` alone at d=128, `--store tma` at d=64 and 128, and
#              `--probs shared --pv-wait pinned` (192-key tiles at d=64, the scheduler's
#              shape at d=128). A shape refused for shared memory or registers is listed,
#              not a failure of the kernel.
#   persistent `check --grid persistent` of the masked examples at sizes with more work
#              tiles than SMs (the rounds alternate direction now)
#   sweep      bench/softmax_sweep.py: OLD's default (the last build measured, if given),
#              the default, the pinned wait (with and without ping-pong, with lazy
#              rescaling, with 176-key tiles), lazy alone, the store, persistent grids
#   shapes     bench/softmax_sweep.py: key tiles of 144-192, P through shared memory (the
#              scheduler's shape, 192-key tiles) with and without the pinned wait
#   flex       bench/flex_variants.py on FLEX_CASES with OURS_ALT (default: the defaults
#              before 2026-12-05, `--rescale eager --pv-wait free --store direct`)
# (Measured on 2026-12-05: bench/results/softmax-pinned_2026-12-05/; the pinned wait, lazy
# rescaling and the store are the defaults since, so their variants here equal `default`.)
# Usage: OUT=dir [WHAT=...] [OLD=path/to/older/einattn] bench/shapes_device.sh [path/to/einattn]
set -u
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
BIN=${1:-target/release/einattn}
WHAT=${WHAT:-checks persistent sweep shapes flex}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/device.txt" 2>&1
date -u >> "$OUT/device.txt"
if [[ $WHAT == *checks* ]]; then
  for dt in bf16 f16; do
    CHECK_FLAGS="--target sm_90a" NS=1000 DS="64 128" DTS=$dt LIMIT=60 \
      timeout 240 bash bench/check_softmax.sh "$BIN" > "$OUT/check_default_$dt.txt" 2>&1 &
  done
  for d in 64 128; do
    wide=176
    [ "$d" = 64 ] && wide=192
    for dt in bf16 f16; do
      CHECK_FLAGS="--target sm_90a --tile m0=$wide --rescale lazy --pv-wait pinned" NS=1000 DS=$d DTS=$dt LIMIT=60 \
        timeout 240 bash bench/check_softmax.sh "$BIN" > "$OUT/check_wide_lazy_d${d}_$dt.txt" 2>&1 &
    done
  done
  CHECK_FLAGS="--target sm_90a --rescale lazy" NS=1000 DS=128 DTS=bf16 LIMIT=60 \
    timeout 240 bash bench/check_softmax.sh "$BIN" > "$OUT/check_lazy_d128_bf16.txt" 2>&1 &
  CHECK_FLAGS="--target sm_90a --pv-wait pinned" NS=1000 DS="64 128" DTS=bf16 LIMIT=60 \
    timeout 240 bash bench/check_softmax.sh "$BIN" > "$OUT/check_pinned_bf16.txt" 2>&1 &
  # Where the store does not apply (decoding, a wider V) the refusal is listed, not failed.
  CHECK_FLAGS="--target sm_90a --store tma" NS=1000 DS="64 128" DTS=bf16 LIMIT=60 \
    timeout 240 bash bench/check_softmax.sh "$BIN" > "$OUT/check_store_tma_bf16.txt" 2>&1 &
  # P through shared memory: FlashAttention-3's 192 x 192 at d=64; the model's shape at
  # d=128 (192 x 128, three warpgroups).
  for dt in bf16 f16; do
    CHECK_FLAGS="--target sm_90a --tile m0=192 --probs shared --pv-wait pinned" NS=1000 DS=64 DTS=$dt LIMIT=60 \
      timeout 240 bash bench/check_softmax.sh "$BIN" > "$OUT/check_probs_shared_d64_$dt.txt" 2>&1 &
    CHECK_FLAGS="--target sm_90a --probs shared --pv-wait pinned" NS=1000 DS=128 DTS=$dt LIMIT=60 \
      timeout 240 bash bench/check_softmax.sh "$BIN" > "$OUT/check_probs_shared_d128_$dt.txt" 2>&1 &
  done
fi
if [[ $WHAT == *persistent* ]]; then
  for d in 64 128; do
    CHECK_FLAGS="--target sm_90a --grid persistent" LIMIT=90 timeout 240 bash -c '
      BIN=$0; source bench/check_lib.sh
      check_lines mixed $1 bf16 <<LIST
attention_causal -D N=1000 -D TILE=40 -D B=2 -D H=16 -D D=$1
attention_alibi -D N=512 -D B=2 -D H=32 -D D=$1
attention_sliding_window -D N=512 -D B=2 -D H=32 -D W=96 -D D=$1
attention_softcap -D N=512 -D B=2 -D H=32 -D D=$1
gqa -D N=512 -D B=2 -D H=32 -D GROUP=4 -D D=$1
LIST
      check_summary' "$BIN" $d > "$OUT/persistent_d$d.txt" 2>&1 &
  done
fi
wait
for f in "$OUT"/check_*.txt "$OUT"/persistent_*.txt; do
  [ -f "$f" ] && echo "$(basename "$f"): $(tail -1 "$f")"
done
# Failures other than a shape the scheduler refuses.
grep -h -v "PASS\|^checks" "$OUT"/check_*.txt "$OUT"/persistent_*.txt 2>/dev/null \
  | grep -v "no kernel shape fits\|the copy engine stores\|narrower than it\|to scratch" | head -20
if [[ $WHAT == *sweep* ]]; then
  old=()
  [ -n "${OLD:-}" ] && old=(old="bin=$OLD")
  timeout "${SWEEP_LIMIT:-540}" python3 bench/softmax_sweep.py "$BIN" "${old[@]}" default= \
    pinned="--pv-wait pinned" pinned_tma="--pv-wait pinned --loads producer-tma" \
    pinned_pp="--pv-wait pinned --loads pingpong-tma" lazy="--rescale lazy" \
    pinned_lazy="--pv-wait pinned --rescale lazy" \
    n176_pinned_lazy="--tile m0=176 --pv-wait pinned --rescale lazy" \
    pinned_lazy_store="--pv-wait pinned --rescale lazy --store tma" \
    persistent="--grid persistent" \
    persistent_pinned_lazy="--grid persistent --pv-wait pinned --rescale lazy" 2>&1 \
    | grep -v Warning > "$OUT/sweep_log.txt"
  tail -16 "$OUT/sweep_log.txt"
fi
if [[ $WHAT == *shapes* ]]; then
  SWEEP_FILE=shapes_sweep timeout "${SWEEP_LIMIT:-540}" python3 bench/softmax_sweep.py "$BIN" default= \
    n144="--tile m0=144" n160="--tile m0=160" n176="--tile m0=176" n192="--tile m0=192" \
    probs="--probs shared" probs_pinned="--probs shared --pv-wait pinned" \
    n192_probs="--tile m0=192 --probs shared" \
    n192_probs_pinned_lazy="--tile m0=192 --probs shared --pv-wait pinned --rescale lazy" 2>&1 \
    | grep -v Warning > "$OUT/shapes_sweep_log.txt"
  tail -16 "$OUT/shapes_sweep_log.txt"
fi
if [[ $WHAT == *flex* ]]; then
  FLEX_CASES=${FLEX_CASES:-alibi,softcap,window,GQA} OURS_ALT=${OURS_ALT:---rescale eager --pv-wait free --store direct} \
    timeout "${FLEX_LIMIT:-150}" python3 bench/flex_variants.py "$BIN" 2>&1 | grep -v Warning > "$OUT/flex_log.txt"
  tail -12 "$OUT/flex_log.txt"
fi
date -u >> "$OUT/device.txt"
