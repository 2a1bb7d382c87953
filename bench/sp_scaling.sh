#!/usr/bin/env bash
# Issue 6's scaling runs on one host of P GPUs (nvidia-h200-x4 / -x8): the LASP-2 and LASP-1
# Lightning plans (bf16, B=4, H=16, d=128) at N = 256K, 1M, 2M tokens and causal softmax
# with the chosen plan at N = 64K, 256K, each timed by `einattn bench --sp P` (every rank
# draws its own inputs, so sizes past one GPU run), next to one GPU's `einattn bench` where
# the whole problem fits. One JSON document per run in $OUT/scaling.jsonl.
# Usage: bench/sp_scaling.sh [path/to/einattn] [P values, default "2 4 8"]
set -uo pipefail
BIN=${1:-target/release/einattn}
PS=${2:-"2 4 8"}
OUT=${OUT:-/tmp/sp_scaling}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi -L > "$OUT/gpus.txt"
record() { # what, command...
  local what=$1; shift
  local json
  json=$(timeout 400 "$@" --format json 2>"$OUT/last.err") || { echo "{\"what\": \"$what\", \"error\": $(python3 -c 'import json,sys;print(json.dumps(open(sys.argv[1]).read()[-400:]))' "$OUT/last.err")}" >> "$OUT/scaling.jsonl"; return; }
  python3 - "$what" "$json" "$*" >> "$OUT/scaling.jsonl" <<'PY'
import json, sys
what, text, cmd = sys.argv[1], sys.argv[2], sys.argv[3]
d = json.loads(text)
d.update({"what": what, "command": cmd})
print(json.dumps(d))
PY
  tail -1 "$OUT/scaling.jsonl"
}
L="examples/lightning.ein -D B=4 -D H=16 -D D=128"
S="examples/attention_causal.ein -D H=16 -D D=128"
# One GPU where the whole problem fits (Lightning is flat per token: the 1M rate stands
# for 2M).
for n in 262144 1048576; do record "lightning one GPU N=$n" $BIN bench $L -D N=$n --reps 10; done
for n in 65536 262144; do record "causal one GPU N=$n" $BIN bench $S -D N=$n --reps 5; done
for p in $PS; do
  [ "$p" -le "$GPUS" ] || continue
  for n in 262144 1048576 2097152; do
    for scheme in lasp2 lasp1; do
      record "lightning $scheme P=$p N=$n" $BIN bench $L -D N=$n --sp $p --scheme $scheme --reps 20
    done
  done
  for n in 65536 262144; do
    record "causal chosen P=$p N=$n" $BIN bench $S -D N=$n --sp $p --reps 5
  done
done
