#!/usr/bin/env bash
# Issue 14's device run: the general lowering on a GPU.
#   examples - `einattn check` on every example the general lowering takes (and
#              lm_head_entropy at a size the interpreter checks quickly), bf16 and f16,
#              sm_90a and sm_80
#   random   - `einattn check` on the random cascades in DIR (written here by
#              `cargo run --release -p einattn-backends --example random_cascades DIR 1000 200`)
# Prints one line per check and a tally; exits non-zero if any check fails.
# Usage: OUT=dir bench/general_device.sh BIN RANDOM_DIR [parts...]
set -uo pipefail
BIN=$1; RANDOM_DIR=$2; shift 2
PARTS=${*:-examples random}
OUT=${OUT:-/tmp}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")/.."

one() {
  local label=$1; shift
  local out line
  out=$("$BIN" check "$@" 2>&1)
  line=$(echo "$out" | grep -E "^(PASS|FAIL)" || echo "$out" | tail -1)
  echo "$label: $line"
}
for part in $PARTS; do
  case $part in
    examples)
      for ex in delta_rule delta_rule_chunked differential_attention document_mask gla gqa \
                linear_feature_map qk_norm relative_bias rmsnorm_gemm sigmoid_attention sink_attention \
                "lm_head_entropy -D T=64 -D D=64 -D VOCAB=4096"; do
        name=${ex%% *}; defs=""
        case $ex in *" "*) defs=${ex#* } ;; esac
        for t in sm_90a sm_80; do
          for dt in bf16 f16; do
            # shellcheck disable=SC2086
            one "$name $t $dt" examples/$name.ein $defs --target $t --dtype $dt --seed 11
          done
        done
      done 2>&1 | tee "$OUT/general_examples.txt"
      ;;
    random)
      for f in "$RANDOM_DIR"/*.ein; do
        one "$(basename "$f")" "$f" --seed 5
      done > "$OUT/general_random.txt"
      grep -c PASS "$OUT/general_random.txt" | sed 's/^/random PASS: /'
      grep -v PASS "$OUT/general_random.txt" | head -20
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
# The tallies live in subshells above for the examples; recount from the files.
p=$(cat "$OUT"/general_*.txt 2>/dev/null | grep -c ": PASS")
f=$(cat "$OUT"/general_*.txt 2>/dev/null | grep -vc ": PASS")
echo "checks: $p passed, $f failed"
[ "$f" = 0 ]
