#!/usr/bin/env bash
# The warp-specialized softmax forward (`--loads producer`) on one H200: `check` of the
# softmax examples under a few producer shapes (each run under a time limit, so a hung
# kernel shows as TIMEOUT instead of stalling the call), then, unless WHAT=checks,
# bench/softmax_sweep.py with the producer shapes beside the default.
# Everything goes to $OUT as it runs.
# Usage: OUT=dir [SHAPES='m0=128:2 m0=64:2'] [NS='256'] [WHAT=checks|all] bench/softmax_ws_device.sh [path/to/einattn]
set -u
export NCCL_NVLS_ENABLE=0
BIN=${1:-target/release/einattn}
LOG=$OUT/ws_checks.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
for shape in ${SHAPES:-m0=128:2 m0=64:2}; do
  flags="--target sm_90a --mma wgmma --loads producer --tile ${shape%%:*} --warps 8 --stages ${shape##*:}"
  for n in ${NS:-256}; do
    for d in 64 128; do
      for dt in bf16 f16; do
        for ex in "attention_mha -D N=$n -D B=1" "attention_causal -D N=$n" "attention_softcap -D N=$n" \
                  "attention_sliding_window -D N=$n -D W=96" "attention_3pass -D M=$n" "gqa -D N=$n" \
                  "flash_decoding -D N=$n" "attention_softcap -D N=300"; do
          # shellcheck disable=SC2086
          out=$(timeout ${LIMIT:-30} "$BIN" check examples/${ex%% *}.ein ${ex#* } -D D=$d --dtype $dt $flags 2>&1); rc=$?
          [ $rc = 124 ] && out="TIMEOUT"
          echo "$ex d=$d $dt [$shape]: rc=$rc $(echo "$out" | grep -E '^(PASS|FAIL)|error|TIMEOUT' | head -2)" | tee -a "$LOG"
        done
      done
    done
  done
done
echo "checks: $(grep -c 'rc=0' "$LOG") passed, $(grep -c 'rc=[1-9]' "$LOG") failed" | tee -a "$LOG"
if [ "${WHAT:-all}" = all ]; then
  python3 bench/softmax_sweep.py "$BIN" 2>&1 | grep -v Warning
fi
