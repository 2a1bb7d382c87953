#!/usr/bin/env bash
# Sequence-parallel runs on a 2-GPU host, in one device call: `einattn check --sp 2` on
# small problems (checked against f64) and on the sizes (checked against our
# single-GPU kernel on the whole problem, which is timed in the same process), then the
# torch + fla LASP-2 reference (anchors_sp.py, carried in .whl/tools; not part of the repository).
# Logs go to $OUT (default /tmp/sp). Usage: bench/sp_device.sh [path/to/einattn]
set -uo pipefail
BIN=${1:-target/release/einattn}
OUT=${OUT:-/tmp/sp}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
run() { # name, command...
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/sp.log"
  local t0=$SECONDS
  timeout 300 "$@" >"$OUT/$name.txt" 2>&1; local rc=$?
  echo "rc=$rc wall=$((SECONDS - t0)) s" | tee -a "$OUT/$name.txt" "$OUT/sp.log"
  cat "$OUT/$name.txt"
}
nvidia-smi -L | tee "$OUT/gpus.txt"
# ONLY=procs runs just the one-process-per-GPU checks; ONLY=ours skips the torch + fla
# reference at the end.
if [ "${ONLY:-}" != procs ]; then
run lightning_small $BIN check examples/lightning.ein -D B=2 -D H=4 -D D=128 -D N=16384 --sp 2
run causal_small $BIN check examples/attention_causal.ein -D H=4 -D D=128 -D N=8192 --sp 2
run lightning_262144 $BIN check examples/lightning.ein -D B=4 -D H=16 -D D=128 -D N=262144 --sp 2
run causal_65536 $BIN check examples/attention_causal.ein -D H=16 -D D=128 -D N=65536 --sp 2
fi
# One process per GPU, as a launcher starts them (RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR, MASTER_PORT); rank 0 prints the report.
launch() { # name, command...
  local name=$1; shift
  echo "== $name (2 processes): $*" | tee -a "$OUT/sp.log"
  local t0=$SECONDS
  for r in 1 0; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 \
      timeout 300 "$@" >"$OUT/$name.rank$r.txt" 2>&1 &
  done
  local rc=0; for j in $(jobs -p); do wait "$j" || rc=$?; done
  echo "rc=$rc wall=$((SECONDS - t0)) s" | tee -a "$OUT/$name.rank0.txt" "$OUT/sp.log"
  cat "$OUT/$name.rank0.txt"; tail -3 "$OUT/$name.rank1.txt"
}
# compile --sp writes the plan and its kernels; run-plan executes that directory.
run compile_plan_65536 $BIN compile examples/lightning.ein -D B=4 -D H=16 -D D=128 -D N=65536 --sp 2 -o "$OUT/plan_lightning_65536"
run run_plan_65536 $BIN run-plan "$OUT/plan_lightning_65536"
launch lightning_65536_procs $BIN check examples/lightning.ein -D B=4 -D H=16 -D D=128 -D N=65536 --sp 2
launch lightning_small_procs $BIN check examples/lightning.ein -D B=2 -D H=4 -D D=128 -D N=16384 --sp 2
launch causal_small_procs $BIN check examples/attention_causal.ein -D H=4 -D D=128 -D N=8192 --sp 2
launch causal_16384_procs $BIN check examples/attention_causal.ein -D H=16 -D D=128 -D N=16384 --sp 2
if [ -z "${ONLY:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  (cd "$OUT" && OUT="$OUT" timeout 300 torchrun --nproc_per_node=2 "$OLDPWD/.whl/tools/anchors_sp.py" >"$OUT/anchors_sp.txt" 2>&1; echo "rc=$?" >>"$OUT/anchors_sp.txt")
  tail -20 "$OUT/anchors_sp.txt"
fi
