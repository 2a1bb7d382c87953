set -u
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
date -u > $OUT/device.txt
for t in sm_90a sm_80; do for dt in bf16 f16; do echo "document_mask $t $dt: $(target/release/einattn check examples/document_mask.ein --target $t --dtype $dt --seed 11 2>&1 | grep -E '^(PASS|FAIL)')"; done; done | tee $OUT/document_mask.txt
OUT=$OUT timeout 200 bench/general_device.sh target/release/einattn .gl/random random 2>&1 | tail -12
