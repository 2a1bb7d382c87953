#!/usr/bin/env bash
# The wgmma softmax forward on one H200: `check` of a few examples under each wgmma shape
# (each run under a time limit, so a hung kernel shows as TIMEOUT instead of stalling the
# call), then bench/softmax_sweep.py. Everything goes to $OUT/wgmma_checks.txt and the
# sweep's files as it runs.
# Usage: OUT=dir [ONLY_D=128] [SWEEP=name,name] [DS='64 128'] [WARPS_LIST='4 8'] bench/softmax_wgmma_device.sh
#        [path/to/einattn] [checks|sweep|all]
set -u
export NCCL_NVLS_ENABLE=0
BIN=${1:-target/release/einattn}
WHAT=${2:-all}
LOG=$OUT/wgmma_checks.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$LOG"
if [ "$WHAT" != sweep ]; then
  for f in ${WARPS_LIST:-4 8}; do
    f="--target sm_90a --mma wgmma --warps $f"
    # Small sizes: the f64 reference of `check` is the cascade interpreter (seconds here;
    # N=1000 at d=128 takes minutes).
    for ex in "attention_mha -D N=256 -D B=1 -D TILE=64" "attention_causal -D N=320 -D TILE=64" \
              "attention_softcap -D N=300" "attention_sliding_window -D N=512 -D W=96" "attention_3pass -D M=256"; do
      for d in ${DS:-64 128}; do
        # shellcheck disable=SC2086
        out=$(timeout 30 "$BIN" check examples/${ex%% *}.ein ${ex#* } -D D=$d $f 2>&1); rc=$?
        [ $rc = 124 ] && out="TIMEOUT"
        echo "$ex d=$d $f: rc=$rc $(echo "$out" | grep -E '^(PASS|FAIL)|error|TIMEOUT' | head -2)" | tee -a "$LOG"
      done
    done
  done
fi
if [ "$WHAT" != checks ]; then
  python3 bench/softmax_sweep.py "$BIN" 2>&1 | grep -v Warning
fi
