set -u
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt; date -u >> $OUT/device.txt
echo "== random"; OUT=$OUT timeout 150 bench/general_device.sh target/release/einattn .gl/random random 2>&1 | tail -12
echo "== old/new"; OUT=$OUT timeout 200 python3 bench/old_new.py target-old/einattn target/release/einattn 3 2>&1 | tail -16
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
echo "== softmax anchors"; OUT=$OUT timeout 120 python3 bench/softmax_compare.py target/release/einattn > $OUT/softmax.log 2>&1; tail -12 $OUT/softmax_compare.md
echo "== lightning anchors"; PYTHONPATH=/tmp/site OUT=$OUT EINATTN_FLAGS="--target sm_90a" timeout 100 python3 bench/lightning_compare.py target/release/einattn > $OUT/lightning.log 2>&1; tail -12 $OUT/lightning_compare.md
