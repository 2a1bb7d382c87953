#!/usr/bin/env bash
# Every SP scheme's kernels and steps on ONE GPU: `einattn check --sp P --scheme S
# --one-gpu` runs the ranks' steps in sequence on GPU 0 with collectives as device copies
# (a simulated ring) and compares with the reference (f64 where small enough, else the
# single-GPU kernel on the whole problem). Causal softmax (attention_causal) and
# non-causal softmax (attention_1pass) take the softmax schemes, Lightning the linear
# ones; P in {2, 4}; then the same with `--overlap` (transfers on a second stream, ordered
# by the plan's events); then a ring plan folder through `run-plan --one-gpu` and `--cpu`.
# Prints one PASS/FAIL line per check and a tally; exits non-zero if any fails. The times
# in the logs mean nothing (every rank shares one GPU).
# Logs go to $OUT (default /tmp/sp_one_gpu); ONLY=REGEX keeps the checks whose label
# matches. Usage: bench/sp_one_gpu.sh [path/to/einattn]
set -uo pipefail
BIN=${1:-target/release/einattn}
OUT=${OUT:-/tmp/sp_one_gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi -L | tee "$OUT/gpus.txt"
pass=0; fail=0
one() { # label, command...
  local label=$1; shift
  # ONLY=REGEX runs the checks whose label matches.
  if [ -n "${ONLY:-}" ] && ! [[ $label =~ $ONLY ]]; then return; fi
  local log="$OUT/$(echo "$label" | tr ' =/' '___').txt"
  local t0=$SECONDS
  timeout 300 "$@" >"$log" 2>&1; local rc=$?
  local line
  line=$(grep -E "^(PASS|FAIL)|: (PASS|FAIL)$" "$log" | tail -1)
  [ -n "$line" ] || line=$(tail -1 "$log")
  if [ $rc = 0 ]; then pass=$((pass+1)); echo "PASS $label ($((SECONDS - t0)) s): $line"
  else fail=$((fail+1)); echo "FAIL $label (rc=$rc, $((SECONDS - t0)) s): $line"; fi
}
SOFTMAX="allgather_kv allgather_kv_zigzag ring ring_zigzag tokenring tokenring_zigzag ulysses"
for p in 2 4; do
  for s in $SOFTMAX; do
    # Small (checked against f64) and larger (checked against one GPU) causal problems.
    one "causal N=4096 H=4 d=64 $s P=$p" \
      $BIN check examples/attention_causal.ein -D H=4 -D D=64 -D N=4096 --sp $p --scheme $s --one-gpu
    one "causal N=16384 H=8 d=128 $s P=$p" \
      $BIN check examples/attention_causal.ein -D H=8 -D D=128 -D N=16384 --sp $p --scheme $s --one-gpu
  done
  # Non-causal, no batch or head ranks (statistics [p] and [p, f]); Ulysses needs heads.
  for s in allgather_kv ring ring_zigzag tokenring tokenring_zigzag; do
    one "1pass M=4096 d=128 $s P=$p" \
      $BIN check examples/attention_1pass.ein -D M=4096 -D D=128 --sp $p --scheme $s --one-gpu
  done
  for s in lasp2 lasp1 ulysses; do
    one "lightning N=16384 H=4 d=128 $s P=$p" \
      $BIN check examples/lightning.ein -D B=2 -D H=4 -D D=128 -D N=16384 --sp $p --scheme $s --one-gpu
  done
done
# Transfers on a second stream, ordered by the plan's events (--overlap): same results.
for p in 2 4; do
  for s in $SOFTMAX; do
    one "overlap causal N=4096 H=4 d=64 $s P=$p" \
      $BIN check examples/attention_causal.ein -D H=4 -D D=64 -D N=4096 --sp $p --scheme $s --one-gpu --overlap
  done
  for s in lasp2 lasp1 ulysses; do
    one "overlap lightning N=16384 H=4 d=128 $s P=$p" \
      $BIN check examples/lightning.ein -D B=2 -D H=4 -D D=128 -D N=16384 --sp $p --scheme $s --one-gpu --overlap
  done
done
# A plan folder: compile writes the plan and its kernels, run-plan runs them.
one "compile ring_zigzag P=4" \
  $BIN compile examples/attention_causal.ein -D H=4 -D D=128 -D N=8192 --sp 4 --scheme ring_zigzag -o "$OUT/plan_ring_zigzag"
one "run-plan --one-gpu ring_zigzag P=4" $BIN run-plan "$OUT/plan_ring_zigzag" --one-gpu
one "run-plan --one-gpu --overlap ring_zigzag P=4" $BIN run-plan "$OUT/plan_ring_zigzag" --one-gpu --overlap
one "run-plan --cpu tokenring P=4" sh -c "$BIN compile examples/attention_causal.ein -D N=512 -D TILE=32 --sp 4 --scheme tokenring -o $OUT/plan_tokenring_cpu >/dev/null && $BIN run-plan $OUT/plan_tokenring_cpu --cpu"
echo "checks: $pass passed, $fail failed (logs in $OUT)"
[ $fail = 0 ]
