# Shared by bench/check_softmax.sh and bench/check_linear.sh (source it): runs
# `einattn check` for each "EXAMPLE DEFINES..." line on stdin with the given size and
# dtype labels, prints one line per check, and counts passes and failures in `pass`/`fail`.
# Kernel flags for every check (e.g. "--target sm_90a") come from $CHECK_FLAGS; each check
# runs under a time limit of $LIMIT seconds (default 120: the f64 reference is the slow part).
# Usage: check_lines N D DTYPE <<LIST ... LIST
pass=0; fail=0
check_lines() {
  local n=$1 d=$2 dt=$3 ex defs out rc line
  while read -r ex defs; do
    [ -z "$ex" ] && continue
    # shellcheck disable=SC2086
    out=$(timeout "${LIMIT:-120}" $BIN check examples/$ex.ein $defs --dtype $dt ${CHECK_FLAGS:-} 2>&1)
    rc=$?
    [ $rc = 124 ] && out="TIMEOUT after ${LIMIT:-120} s"
    line=$(echo "$out" | grep -E "^(PASS|FAIL)" || echo "$out" | tail -1)
    if [ $rc = 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); fi
    echo "$ex N=$n d=$d $dt: $line"
  done
}
# The tally and the exit status of the whole run.
check_summary() {
  echo "checks: $pass passed, $fail failed"
  [ $fail = 0 ]
}
