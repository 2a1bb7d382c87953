#!/usr/bin/env bash
# Issue 4's device run, in the order of importance (a call may be cut short):
#   compare  - ours (wgmma on sm_90a) vs fla chunk_lightning_attn / chunk_simple_gla and
#              OpenNLPLab lightning_attn2, B=4 H=16 d=e=128 bf16, N in {8192, 32768, 65536};
#              plus ours without decay and at d=e=64
#   wgmma    - bench/check_linear.sh with --target sm_90a (the wgmma kernels)
#   sync     - bench/check_linear.sh with --target sm_80 (the mma.sync kernels)
#   softmax  - bench/check_softmax.sh (the shared-tile layout is common to both families)
#   bwd      - issue 16: ours forward + backward (the linear backward kernels) vs fla
#              chunk_lightning_attn forward + backward, B=4 H=16 d=e=128 bf16, N in {8192, 32768}
#   grad90 / grad80 - bench/check_grad.sh on the linear examples, --target sm_90a / sm_80
# Usage: OUT=dir bench/linear_device.sh [path/to/einattn] [parts...]   (default: all)
set -uo pipefail
B=${1:-target/release/einattn}
shift || true
PARTS=${*:-compare wgmma sync softmax}
OUT=${OUT:-/tmp}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."
status=0
for part in $PARTS; do
  case $part in
    compare)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      OUT=$OUT EINATTN_FLAGS="--target sm_90a" python3 bench/lightning_compare.py "$B" || status=1
      for n in 8192 65536; do
        "$B" bench examples/linear_causal.ein -D B=4 -D H=16 -D D=128 -D N=$n --target sm_90a \
          --reps 30 --format json > "$OUT/nodecay_$n.json" && tail -c 400 "$OUT/nodecay_$n.json"
      done
      "$B" bench examples/lightning.ein -D B=4 -D H=16 -D D=64 -D N=32768 -D BLOCK=64 \
        --target sm_90a --reps 30 --format json > "$OUT/d64.json" && tail -c 400 "$OUT/d64.json"
      ;;
    bwd)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      OUT=$OUT EINATTN_FLAGS="--target sm_90a" python3 bench/lightning_bwd_compare.py "$B" || status=1
      ;;
    grad90|grad80)
      t=sm_90a; [ "$part" = grad80 ] && t=sm_80
      GRAD_ONLY="lightning linear_causal lightning_naive linear_attention gated_linear linear_feature_map" \
        bench/check_grad.sh "$B" $t | tee "$OUT/checks_grad_linear_$t.txt" | tail -3 || status=1
      ;;
    wgmma) CHECK_FLAGS="--target sm_90a" bench/check_linear.sh "$B" | tee "$OUT/checks_linear_sm90a.txt" | tail -3 || status=1 ;;
    sync) CHECK_FLAGS="--target sm_80" bench/check_linear.sh "$B" | tee "$OUT/checks_linear_sm80.txt" | tail -3 || status=1 ;;
    softmax) bench/check_softmax.sh "$B" | tee "$OUT/checks_softmax.txt" | tail -3 || status=1 ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
