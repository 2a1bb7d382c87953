set -u
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt; date -u >> $OUT/device.txt
echo "== tests sp"; OUT=$OUT timeout 150 bench/refactor_device.sh target/release/einattn target-old/einattn target/release/deps/cli-b1f462e2242f0955 tests sp 2>&1 | tail -30
echo "== rust-app"; timeout 60 target/release/rust-app 2>&1 | tee $OUT/rust_app.txt | tail -15
echo "== python"; python3 -m pip install -q --no-index --no-deps --target /tmp/site target/wheels/einattn-*.whl 2>&1 | tail -2
PYTHONPATH=/tmp/site timeout 150 python3 python/tests/device_check.py --out $OUT 2>&1 | tail -25
echo "== general examples"; OUT=$OUT timeout 200 bench/general_device.sh target/release/einattn .gl/random examples 2>&1 | tail -60
