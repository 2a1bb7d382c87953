"""Wall time of `einattn compile` (parse, analyze, schedule, Tile IR, PTX, manifest) on the CPU.

Usage: python3 bench/compile_time.py [path/to/einattn] > bench/results/compile_time_DATE/compile_time.json
Runs each example 30 times (after one warm-up) and reports the median and max wall time.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"
examples = ["attention_1pass", "attention_3pass", "attention_causal", "attention_sliding_window",
            "attention_softcap", "flash_decoding"]
rows = []
with tempfile.TemporaryDirectory() as out:
    for ex in examples:
        cmd = [binary, "compile", f"examples/{ex}.ein", "--target", "sm_90a", "-o", out]
        subprocess.run(cmd, check=True, capture_output=True)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(example=ex, command=" ".join(cmd), median_ms=round(statistics.median(times), 2),
                         max_ms=round(max(times), 2)))
cpu = "unknown"
try:
    with open("/proc/cpuinfo") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
except (OSError, StopIteration):
    pass
print(json.dumps(dict(
    what="einattn compile wall time (process start to exit, all stages to PTX + manifest)",
    command="python3 bench/compile_time.py " + binary,
    device=f"CPU: {cpu}, {os.cpu_count()} cores, {platform.system()}",
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    results=rows), indent=1))
