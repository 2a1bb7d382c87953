#!/usr/bin/env bash
# Issue 13's device run: the kernels after the back-half refactor (exec crate, launch
# contracts, plans that carry their kernels), in the order of importance.
#   tests   - the CLI test binary on the GPU (run-plan launches the PTX in its folder)
#   sp      - check --sp 2 --one-gpu for every lowered scheme on Lightning and causal softmax
#   checks  - bench/check_softmax.sh, bench/check_linear.sh (sm_90a and sm_80)
#   compare - bench/softmax_compare.py and bench/lightning_compare.py, OLD then NEW binary
# Usage: OUT=dir bench/refactor_device.sh NEW_BIN OLD_BIN CLI_TEST_BIN [parts...]
set -uo pipefail
NEW=$1; OLD=$2; TESTS=$3; shift 3
PARTS=${*:-tests sp checks compare}
OUT=${OUT:-/tmp}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
cd "$(dirname "$0")/.."
status=0
for part in $PARTS; do
  case $part in
    tests) EINATTN=$NEW "$TESTS" --nocapture 2>&1 | tail -25 | tee "$OUT/cli_tests.txt" ;;
    sp)
      for s in lasp2 lasp1 ulysses; do
        echo "lightning $s:"; "$NEW" check examples/lightning.ein -D N=4096 -D D=128 --sp 2 --scheme $s --one-gpu --seed 3 2>&1 | grep -E "PASS|FAIL|error" || status=1
      done | tee "$OUT/sp_one_gpu.txt"
      for s in allgather_kv allgather_kv_zigzag ulysses; do
        echo "attention_causal $s:"; "$NEW" check examples/attention_causal.ein -D N=4096 -D D=128 --sp 2 --scheme $s --one-gpu --seed 3 2>&1 | grep -E "PASS|FAIL|error" || status=1
      done | tee -a "$OUT/sp_one_gpu.txt"
      ;;
    checks)
      bench/check_softmax.sh "$NEW" > "$OUT/checks_softmax.txt"; tail -1 "$OUT/checks_softmax.txt"
      CHECK_FLAGS="--target sm_90a" bench/check_linear.sh "$NEW" > "$OUT/checks_linear_sm90a.txt"; tail -1 "$OUT/checks_linear_sm90a.txt"
      CHECK_FLAGS="--target sm_80" bench/check_linear.sh "$NEW" > "$OUT/checks_linear_sm80.txt"; tail -1 "$OUT/checks_linear_sm80.txt"
      ;;
    compare)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      for which in old new; do
        bin=$OLD; [ $which = new ] && bin=$NEW
        mkdir -p "$OUT/$which"
        OUT=$OUT/$which python3 bench/softmax_compare.py "$bin" > "$OUT/$which/softmax.log" 2>&1
        OUT=$OUT/$which EINATTN_FLAGS="--target sm_90a" python3 bench/lightning_compare.py "$bin" > "$OUT/$which/lightning.log" 2>&1
      done
      ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
