"""Our softmax forward kernels under several schedules, beside SDPA's FA2 and cuDNN, in one
device call: which tensor-core path and tile shape is fastest per problem.

Problems: bf16, B*N = 16384, H*d = 2048, d in {128, 64}, N in {4096, 16384}, causal or not
(the shapes of bench/softmax_compare.py). Each schedule is a set of `einattn bench` flags;
"default" is the scheduler's own choice. Writes $OUT/softmax_sweep.json and .md ($SWEEP_FILE names them otherwise).
TFLOP/s = 4*B*H*N^2*d / time (halved when causal); medians (CUDA events for ours,
triton.testing.do_bench for the baselines).
Usage: [ONLY_D=128] [ONLY_N=4096] [SWEEP=name,...] python3 bench/softmax_sweep.py [path/to/einattn] [NAME=FLAGS ...]
(FLAGS may start with `bin=PATH` to run another binary.)
"""
import datetime
import json
import os
import subprocess
import sys

import torch
import triton
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

OUT = os.environ.get("OUT", "/tmp")

SCHEDULES = {
    "default": "",
    "sync": "--target sm_90a --mma sync",
    "wgmma": "--target sm_90a --mma wgmma",
    "wg_128x128_w8_s2": "--target sm_90a --mma wgmma --loads cooperative --tile p0=128,m0=128 --warps 8 --stages 2",
    "wg_128x64_w8_s3": "--target sm_90a --mma wgmma --loads cooperative --tile p0=128,m0=64 --warps 8 --stages 3",
    "wg_128x64_w8_s2": "--target sm_90a --mma wgmma --loads cooperative --tile p0=128,m0=64 --warps 8 --stages 2",
    "wg_128x32_w8_s2": "--target sm_90a --mma wgmma --loads cooperative --tile p0=128,m0=32 --warps 8 --stages 2",
    "wg_64x128_w4_s2": "--target sm_90a --mma wgmma --loads cooperative --tile p0=64,m0=128 --warps 4 --stages 2",
    "wg_64x64_w4_s3": "--target sm_90a --mma wgmma --loads cooperative --tile p0=64,m0=64 --warps 4 --stages 3",
    # Every thread copies K and V (the sm_90a default before warp specialization).
    "coop": "--target sm_90a --mma wgmma --loads cooperative",
    # Warp-specialized: a producer warpgroup copies K and V (`--loads producer`), with the
    # compute warpgroups taking turns (`--loads pingpong`) or not.
    "producer_128x128": "--target sm_90a --mma wgmma --loads producer --tile p0=128,m0=128 --warps 8 --stages 2",
    "pingpong_128x128": "--target sm_90a --mma wgmma --loads pingpong --tile p0=128,m0=128 --warps 8 --stages 2",
    "producer_192x64": "--target sm_90a --mma wgmma --loads producer --tile p0=192,m0=64 --warps 12 --stages 3",
    # The same with the copy engine (tensor maps, one issuing thread): the scheduler's tiles.
    "tma": "--target sm_90a --mma wgmma --loads producer-tma",
    "tma_pp": "--target sm_90a --mma wgmma --loads pingpong-tma",
    "tma_128x64_s3": "--target sm_90a --mma wgmma --loads producer-tma --tile p0=128,m0=64 --warps 8 --stages 3",
    "tma_128x128_s3": "--target sm_90a --mma wgmma --loads producer-tma --tile p0=128,m0=128 --warps 8 --stages 3",
}


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def main():
    dev = torch.cuda.get_device_properties(0)
    env = dict(gpu=dev.name, sms=dev.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               command=" ".join(sys.argv))
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"
    schedules = dict(SCHEDULES)
    if len(sys.argv) > 2:
        schedules = dict(a.split("=", 1) for a in sys.argv[2:])
    if os.environ.get("SWEEP"):
        schedules = {k: schedules[k] for k in os.environ["SWEEP"].split(",")}
    problems = [(d, n, c) for d in (128, 64) for n in (4096, 16384) for c in (False, True)]
    only_d, only_n = os.environ.get("ONLY_D"), os.environ.get("ONLY_N")
    if only_d:
        problems = [p for p in problems if str(p[0]) == only_d]
    if only_n:
        problems = [p for p in problems if str(p[1]) == only_n]
    print(env, flush=True)

    def ours(flags, d, n, B, H, causal):
        example = "examples/attention_causal.ein" if causal else "examples/attention_mha.ein"
        # A schedule may name its own binary ("bin=PATH FLAGS...": an earlier build, for a
        # before/after comparison in one call).
        exe = binary
        if flags.startswith("bin="):
            exe, _, flags = flags[4:].partition(" ")
        # The examples' split tiles (p0, m0) follow TILE; --tile overrides the kernel's.
        cmd = [exe, "bench", example, "-D", f"B={B}", "-D", f"H={H}", "-D", f"N={n}",
               "-D", f"D={d}", "-D", "TILE=64", "--reps", "100", "--format", "json"] + flags.split()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            print("ours timed out:", " ".join(cmd), flush=True)
            return None
        if r.returncode != 0:
            print("ours failed:", " ".join(cmd), r.stderr[-400:], flush=True)
            return None
        out = json.loads(r.stdout)
        out["command"] = " ".join(cmd)
        return out

    rows = []
    for d, n, causal in problems:
        H = 2048 // d
        B = 16384 // n
        flops = 4 * B * H * n * n * d / (2 if causal else 1)
        q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row = dict(d=d, n=n, B=B, H=H, causal=causal)
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                row[name] = round(flops / ms / 1e9, 1)
            except Exception as e:  # noqa: BLE001
                row[name] = None
                print(name, "failed", repr(e)[:200], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
        for sname, flags in schedules.items():
            o = ours(flags, d, n, B, H, causal)
            if o is None:
                row[sname] = None
                continue
            tf = round(flops / o["median_ms"] / 1e9, 1)
            row[sname] = tf
            row[sname + "_detail"] = dict(ms=o["median_ms"], schedule=o.get("schedule"),
                                         registers=o.get("registers"),
                                         predicted_ms=o.get("predicted_ms"), command=o["command"])
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("_detail")}, flush=True)

    with open(os.path.join(OUT, os.environ.get("SWEEP_FILE", "softmax_sweep") + ".json"), "w") as f:
        json.dump(dict(env=env, schedules=schedules, rows=rows), f, indent=1)
    names = list(schedules)
    lines = [f"Device: {env['gpu']}, torch {env['torch']}; {env['date']}; TFLOP/s (ratio to cuDNN)", "",
             "| d | N | causal | FA2 | cuDNN | " + " | ".join(names) + " |",
             "| --- " * (5 + len(names)) + "|"]
    for r in rows:
        cells = []
        for s in names:
            t = r.get(s)
            cells.append("-" if t is None else f"{t} ({t / r['cudnn']:.2f})" if r.get("cudnn") else str(t))
        lines.append(f"| {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {r['flash']} | {r['cudnn']} | "
                     + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, os.environ.get("SWEEP_FILE", "softmax_sweep") + ".md"), "w") as f:
        f.write(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
