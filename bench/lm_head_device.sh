#!/usr/bin/env bash
# Issue 14's lm-head run: lm_head_entropy through the projection family (one-pass GEMM with
# running row statistics) on a GPU.
#   check  - `einattn check` at small/ragged sizes and at the full shape, sm_90a (wgmma and
#            mma.sync) and sm_80, bf16 and f16
#   bench  - `einattn bench` at T=8192 D=4096 VOCAB=32768 for the default shape and a sweep
#            of --tile/--warps/--stages overrides; time, TFLOP/s and % of the roofline
#   full   - one check at the full size (the reference is a threaded f64 GEMM on the CPU: ~1 min)
#   torch  - the torch anchor (bf16 matmul + logsumexp/entropy), if torch is installed
# Prints one line per run and a table last; exits non-zero if any check fails.
# Usage: OUT=dir bench/lm_head_device.sh BIN [parts...]
#   SIZES="-D T=.. -D D=.. -D VOCAB=..|..." and TARGETS="sm_90a:wgmma sm_80:sync" narrow the checks;
#   LIMIT (seconds, default 60) bounds each run.
#   SWEEP="v=128:8:5 v=128:8:6 ..." overrides the bench sweep (tile v : warps : stages; tile t=64 with 4 warps).
set -uo pipefail
BIN=$1; shift
PARTS=${*:-check bench torch}
OUT=${OUT:-/tmp}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."
EX=examples/lm_head_entropy.ein
FULL="-D T=8192 -D D=4096 -D VOCAB=32768"
fails=0
one() {
  local label=$1; shift
  local out line
  # A time limit per run, so a hung kernel shows as TIMEOUT instead of stalling the call.
  out=$(timeout "${LIMIT:-60}" "$BIN" check "$@" 2>&1) || [ $? != 124 ] || out="TIMEOUT"
  line=$(echo "$out" | grep -E "^(PASS|FAIL)" || echo "$out" | tail -1)
  echo "$label: $line  [$(echo "$out" | grep -E '^kernel:' | sed 's/^kernel: //')]"
  case $line in PASS*) ;; *) fails=$((fails + 1)) ;; esac
}
for part in $PARTS; do
  case $part in
    check)
      SIZES=${SIZES:-"-D T=128 -D D=64 -D VOCAB=256|-D T=300 -D D=192 -D VOCAB=1000|-D T=64 -D D=4096 -D VOCAB=32768|-D T=1000 -D D=4096 -D VOCAB=5000"}
      IFS='|' read -r -a sizes <<< "$SIZES"
      for defs in "${sizes[@]}"; do
        for tm in ${TARGETS:-"sm_90a:wgmma" "sm_90a:sync" "sm_80:sync"}; do
          tm=${tm/:/ }
          set -- $tm
          for dt in bf16 f16; do
            # shellcheck disable=SC2086
            one "check $defs $1 $2 $dt" $EX $defs --target $1 --mma $2 --dtype $dt --seed 5
          done
        done
      done 2>&1 | tee "$OUT/lm_head_check.txt"
      fails=$((fails + $(grep -cv ": PASS" "$OUT/lm_head_check.txt")))
      ;;
    full)
      # shellcheck disable=SC2086
      one "check full sm_90a wgmma bf16" $EX $FULL --target sm_90a --dtype bf16 --seed 3 | tee -a "$OUT/lm_head_check.txt"
      ;;
    bench)
      SWEEP=${SWEEP:-"v=128:8:4 v=128:8:6 v=64:8:6 t=64,v=128:4:6 t=64,v=128:4:4 v=192:8:4"}
      {
        "$BIN" analyze $EX $FULL 2>&1 | grep -iE "roofline|floor|tensor" | head -5
        for cfg in default $SWEEP; do
          args=""
          if [ "$cfg" != default ]; then
            IFS=: read -r tile warps stages <<< "$cfg"
            args="--tile $tile --warps $warps --stages $stages"
          fi
          # shellcheck disable=SC2086
          out=$(timeout "${LIMIT:-60}" "$BIN" bench $EX $FULL --target sm_90a $args --reps 20 2>&1) || [ $? != 124 ] || out="TIMEOUT"
          echo "bench [$cfg]: $(echo "$out" | grep -E "registers|median|TFLOP" | tr '\n' ' ')"
        done
        # shellcheck disable=SC2086
        out=$(timeout "${LIMIT:-60}" "$BIN" bench $EX $FULL --target sm_90a --mma sync --reps 10 2>&1) || [ $? != 124 ] || out="TIMEOUT"
        echo "bench [mma.sync on sm_90a]: $(echo "$out" | grep -E "registers|median|TFLOP" | tr '\n' ' ')"
      } 2>&1 | tee "$OUT/lm_head_bench.txt"
      ;;
    torch)
      python3 bench/lm_head_torch.py 2>&1 | tee "$OUT/lm_head_torch.txt" || true
      ;;
  esac
done
echo "=== summary ==="
grep -h -E "^(check|bench)" "$OUT"/lm_head_check.txt "$OUT"/lm_head_bench.txt 2>/dev/null | sed 's/  \[.*//' | cut -c1-220
cat "$OUT/lm_head_torch.txt" 2>/dev/null | tail -3
echo "failed checks: $fails"
[ "$fails" -eq 0 ]
