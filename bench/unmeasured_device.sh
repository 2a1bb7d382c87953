#!/usr/bin/env bash
# The kernels built on 2026-12-03 whose first GPU run is still owed (no device time was
# left for them that day), in one device call of about 8 minutes. Every part runs under its
# own time limit and writes under $OUT as it goes, so a slow or hung part costs only its
# own limit.
#   lmhead  - the projection family (lm_head_entropy): checks, full-size bench and sweep,
#             torch anchor (bench/lm_head_device.sh)
#   linbwd  - the linear backward kernels: check --grad (sm_90a, sm_80), then forward +
#             backward against fla's chunk_lightning_attn (bench/linear_device.sh bwd)
#   wgmma   - the softmax forward on wgmma (opt-in): checks at small sizes, then the
#             d=128 and d=64 sweep against FA2/cuDNN (bench/softmax_wgmma_device.sh)
#   gqa     - grouped-query attention on the softmax fast path: check at a few sizes
# Usage: OUT=dir bench/unmeasured_device.sh [path/to/einattn] [parts...]
#   (carry the binary and .whl/ for linbwd)
set -uo pipefail
BIN=${1:-target/release/einattn}
shift || true
PARTS=${*:-lmhead linbwd wgmma gqa}
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."
stamp() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$OUT/parts.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; } > "$OUT/device.txt"
for part in $PARTS; do
  stamp "start $part"
  case $part in
    lmhead)
      LIMIT=40 SIZES="-D T=128 -D D=64 -D VOCAB=256|-D T=300 -D D=192 -D VOCAB=1000|-D T=64 -D D=4096 -D VOCAB=32768" \
        timeout 150 bash bench/lm_head_device.sh "$BIN" check bench torch > "$OUT/lm_head_log.txt" 2>&1
      ;;
    linbwd)
      LIMIT=40 GRAD_ONLY="lightning linear_causal lightning_naive linear_attention" \
        timeout 60 bash bench/check_grad.sh "$BIN" sm_90a > "$OUT/checks_grad_linear_sm_90a.txt" 2>&1
      LIMIT=40 GRAD_ONLY="lightning linear_causal" \
        timeout 40 bash bench/check_grad.sh "$BIN" sm_80 > "$OUT/checks_grad_linear_sm_80.txt" 2>&1
      timeout 150 bash bench/linear_device.sh "$BIN" bwd > "$OUT/bwd_log.txt" 2>&1
      ;;
    wgmma)
      timeout 60 bash bench/softmax_wgmma_device.sh "$BIN" checks > "$OUT/wgmma_checks_log.txt" 2>&1
      SWEEP=default,wg_128x128_w8_s2,wg_128x64_w8_s3,wg_64x128_w4_s2,wg_64x64_w4_s3 \
        timeout 150 bash bench/softmax_wgmma_device.sh "$BIN" sweep > "$OUT/wgmma_sweep_log.txt" 2>&1
      ;;
    gqa)
      for t in sm_90a sm_80; do
        for dt in bf16 f16; do
          for defs in "-D N=256 -D D=64" "-D N=300 -D D=128 -D GROUP=8" "-D N=320 -D D=128 -D GROUP=2"; do
            # shellcheck disable=SC2086
            out=$(timeout 40 "$BIN" check examples/gqa.ein $defs --target $t --dtype $dt 2>&1) || [ $? != 124 ] || out=TIMEOUT
            echo "gqa $defs $t $dt: $(echo "$out" | grep -E '^(PASS|FAIL)|error|TIMEOUT' | head -1)"
          done
        done
      done > "$OUT/gqa_checks.txt" 2>&1
      ;;
  esac
  stamp "end $part"
done
