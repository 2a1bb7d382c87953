set -u
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
BIN=target/einattn_def2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $OUT/device.txt 2>&1; date -u >> $OUT/device.txt
CHECK_FLAGS="--target sm_90a" NS=1000 DS="64 128" DTS=bf16 LIMIT=60 timeout 110 bash bench/check_softmax.sh $BIN > $OUT/check_default_bf16.txt 2>&1 &
CHECK_FLAGS="--target sm_90a" NS=1000 DS="64 128" DTS=f16 LIMIT=60 timeout 110 bash bench/check_softmax.sh $BIN > $OUT/check_default_f16.txt 2>&1 &
wait
for f in $OUT/check_*.txt; do echo "$(basename $f): $(tail -1 $f)"; done
grep -h -v "PASS\|^checks" $OUT/check_*.txt | head -8
echo "== python"; python3 -m pip install -q --no-index --no-deps --target /tmp/site target/wheels/einattn-*.whl 2>&1 | tail -2
PYTHONPATH=/tmp/site timeout 60 python3 python/tests/device_check.py --out $OUT > $OUT/python.txt 2>&1; tail -8 $OUT/python.txt
echo "== flex"; FLEX_CASES=alibi,GQA timeout 100 python3 bench/flex_variants.py $BIN 2>&1 | grep -v Warning > $OUT/flex_log.txt; cat $OUT/flex_variants.md
