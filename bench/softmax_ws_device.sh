#!/usr/bin/env bash
# The warp-specialized softmax forward on one H200, in one call. Steps (WHAT, default all):
#   shapes  `check` of the softmax examples under each producer shape in SHAPES (each run
#           under a time limit, so a hung kernel shows as TIMEOUT instead of stalling)
#   checks  bench/check_softmax.sh with the scheduler's own choice (NS sizes)
#   sweep   bench/softmax_sweep.py: the default beside the cooperative and producer forms
#   decode  bench/decode_compare.py: decoding, default beside the cooperative form
#   flex    bench/flex_variants.py: ALiBi, soft-cap, window, GQA, cross-attention against
#           FlexAttention and SDPA
#   window  the plain sliding window of the flex step under other schedules (run after flex)
#   documents  `check` of document masks at N=1000 and 2048 (several key tiles per
#           document), both targets, d 64/128, bf16/f16
#   sm80    bench/check_softmax.sh with sm_80 kernels (mma.sync) on the same GPU
#   scores  `check` of the score-modified examples (ALiBi, window with ALiBi, soft-cap),
#           cross-attention and document masks, both targets, d 64/128, bf16/f16, N=1000
#   sp      sequence-parallel plans of sm_90a kernels on one GPU (ring, tokenring, P=2)
#   python  the PyTorch op (python/tests/device_check.py) from the wheel in target/wheels
# Everything goes to $OUT as it runs (logs of flex, sp and python to $OUT/extra.txt).
# Usage: OUT=dir [WHAT='shapes checks sweep decode'] [SHAPES='m0=128:2 m0=64:3'] [NS='1000']
#        bench/softmax_ws_device.sh [path/to/einattn]
set -u
export NCCL_NVLS_ENABLE=0
BIN=${1:-target/release/einattn}
WHAT=${WHAT:-shapes checks sweep decode}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
if [[ $WHAT == *shapes* ]]; then
  LOG=$OUT/ws_checks.txt
  for shape in ${SHAPES:-m0=128:2 m0=64:3}; do
    flags="--target sm_90a --mma wgmma --loads ${LOADS:-producer} --tile ${shape%%:*} --warps 8 --stages ${shape##*:}"
    for d in 64 128; do
      for dt in bf16 f16; do
        for ex in "attention_mha -D N=256 -D B=1" "attention_causal -D N=256" "attention_softcap -D N=256" \
                  "attention_sliding_window -D N=256 -D W=96" "attention_3pass -D M=256" "gqa -D N=256" \
                  "flash_decoding -D N=256" "attention_softcap -D N=300"; do
          # shellcheck disable=SC2086
          out=$(timeout "${LIMIT:-30}" "$BIN" check examples/${ex%% *}.ein ${ex#* } -D D=$d --dtype $dt $flags 2>&1); rc=$?
          [ $rc = 124 ] && out="TIMEOUT"
          echo "$ex d=$d $dt [$shape]: rc=$rc $(echo "$out" | grep -E '^(PASS|FAIL)|error|TIMEOUT' | head -2)" >> "$LOG"
        done
      done
    done
  done
  echo "shape checks: $(grep -c 'rc=0' "$LOG") passed, $(grep -c 'rc=[1-9]' "$LOG") failed" | tee -a "$LOG"
fi
if [[ $WHAT == *checks* ]]; then
  NS=${NS:-1000} LIMIT=${LIMIT:-40} bash bench/check_softmax.sh "$BIN" > "$OUT/check_softmax.txt" 2>&1
  tail -1 "$OUT/check_softmax.txt"
fi
if [[ $WHAT == *sweep* ]]; then
  SWEEP=${SWEEP:-default,coop,producer_128x128} timeout 300 python3 bench/softmax_sweep.py "$BIN" 2>&1 \
    | grep -v Warning > "$OUT/sweep_log.txt"
  tail -11 "$OUT/sweep_log.txt"
fi
if [[ $WHAT == *decode* ]]; then
  timeout 200 python3 bench/decode_compare.py "$BIN" default= coop="--target sm_90a --mma wgmma --loads cooperative" \
    > "$OUT/decode_log.txt" 2>&1
  tail -6 "$OUT/decode_log.txt"
fi
if [[ $WHAT == *flex* ]]; then
  timeout 300 python3 bench/flex_variants.py "$BIN" 2>&1 | grep -v Warning > /tmp/flex_log.txt
  tail -12 /tmp/flex_log.txt | tee -a "$OUT/extra.txt"
fi
if [[ $WHAT == *window* ]]; then
  for flags in "" "--loads cooperative" "--loads producer-tma" "--tile m0=128" \
               "--tile p0=64,m0=64 --warps 4 --loads cooperative" "--stages 3"; do
    # shellcheck disable=SC2086
    ms=$(timeout 60 "$BIN" bench "$OUT/attention_window_plain.ein" -D B=2 -D H=16 -D N=8192 -D D=128 \
      -D W=256 -D TILE=64 --reps 100 --format json $flags 2>&1 | grep -o '"median_ms": *[0-9.]*')
    echo "window W=256 plain [${flags:-default}]: $ms" | tee -a "$OUT/extra.txt"
  done
fi
if [[ $WHAT == *scores* ]]; then
  for target in sm_90a sm_80; do
    CHECK_FLAGS="--target $target" LIMIT=${LIMIT:-40} bash -c '
      BIN=$0; source bench/check_lib.sh
      for d in 64 128; do for dt in bf16 f16; do check_lines 1000 $d $dt <<LIST
attention_alibi -D N=1000 -D D=$d -D TILE=40
attention_sliding_window -D N=1000 -D D=$d -D TILE=40
attention_softcap -D N=1000 -D D=$d
cross_attention -D N=1000 -D M=1001 -D D=$d -D TILE=77
document_mask -D N=1000 -D D=$d -D TILE=40 -D B=2 -D H=4
LIST
      done; done; check_summary' "$BIN" | sed "s/^/$target /" | tee -a "$OUT/check_scores.txt" | tail -1
  done
fi
if [[ $WHAT == *documents* ]]; then
  for target in sm_90a sm_80; do
    CHECK_FLAGS="--target $target" LIMIT=${LIMIT:-60} bash -c '
      BIN=$0; source bench/check_lib.sh
      for d in 64 128; do for dt in bf16 f16; do
        check_lines 1000 $d $dt <<< "document_mask -D N=1000 -D D=$d -D TILE=40 -D B=2 -D H=4"
        check_lines 2048 $d $dt <<< "document_mask -D N=2048 -D D=$d -D B=1 -D H=2"
      done; done; check_summary' "$BIN" | sed "s/^/$target /" | tee -a "$OUT/check_documents.txt" | tail -1
  done
fi
if [[ $WHAT == *sm80* ]]; then
  CHECK_FLAGS="--target sm_80" NS=${NS:-1000} LIMIT=${LIMIT:-40} bash bench/check_softmax.sh "$BIN" \
    > "$OUT/check_softmax_sm80.txt" 2>&1
  tail -1 "$OUT/check_softmax_sm80.txt"
fi
if [[ $WHAT == *sp* ]]; then
  for s in ring tokenring; do
    echo "sp $s: $(timeout 120 "$BIN" check examples/attention_causal.ein -D H=4 -D D=64 -D N=4096 \
      --sp 2 --scheme $s --one-gpu --target sm_90a 2>&1 | grep -E '^(PASS|FAIL)|error' | tail -1)" | tee -a "$OUT/extra.txt"
  done
fi
if [[ $WHAT == *python* ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site target/wheels/einattn-*.whl
  PYTHONPATH=/tmp/site timeout 200 python3 python/tests/device_check.py --einattn "$BIN" --out "$OUT" 2>&1 \
    | tail -15 | tee -a "$OUT/extra.txt"
fi
