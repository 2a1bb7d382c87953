"""Softmax-attention backward: our backward kernels (`einattn bench --grad`, the dQ and
dK/dV kernels derived from the forward) against PyTorch SDPA's backward (flash = FA2, and
cuDNN) on the same shapes, in one device call. bf16, d=128, H=16, B*N = 16384, N in
{4096, 16384}, causal or not. TFLOP/s = 2.5 x the forward's 4*B*H*N^2*d (halved when
causal), the usual convention, so the numbers are comparable whatever each computes.
Writes $OUT/softmax_bwd_compare.json and .md.
Usage: python3 bench/softmax_bwd_compare.py [path/to/einattn]
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

# Kernel shapes of ours to time (flags of `einattn bench --grad`); the fastest is reported
# as `ours`, every one under `variants`.
VARIANTS = [
    ("default", []),
    ("sync", ["--mma", "sync", "--tile", "m=32"]),
    ("sync_n64", ["--mma", "sync", "--tile", "m=64"]),
    ("wgmma_n32", ["--mma", "wgmma", "--tile", "m=32"]),
    ("wgmma_w8_n64", ["--mma", "wgmma", "--warps", "8", "--tile", "m=64"]),
]


def bench(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"
    dev = torch.cuda.get_device_properties(0)
    env = dict(gpu=dev.name, torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               command=" ".join(sys.argv))
    print(env, flush=True)
    rows = []
    for n in (4096, 16384):
        d, H = 128, 16
        B = 16384 // n
        for causal in (False, True):
            flops = 2.5 * 4 * B * H * n * n * d / (2 if causal else 1)
            row = dict(n=n, B=B, H=H, d=d, causal=causal)
            example = "examples/attention_causal.ein" if causal else "examples/attention_mha.ein"
            row["variants"] = {}
            for vname, flags in VARIANTS:
                cmd = [binary, "bench", "--grad", example, "-D", f"B={B}", "-D", f"H={H}",
                       "-D", f"N={n}", "-D", f"D={d}", "--reps", "30", "--format", "json"] + flags
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    row["variants"][vname] = dict(error=r.stderr[-300:])
                    continue
                o = json.loads(r.stdout)
                row["variants"][vname] = dict(ms=o["median_ms"], tflops=round(flops / o["median_ms"] / 1e9, 1),
                                              kernel=o.get("kernel"), command=" ".join(cmd))
                if "ours_ms" not in row or o["median_ms"] < row["ours_ms"]:
                    row.update(ours_ms=o["median_ms"], ours=round(flops / o["median_ms"] / 1e9, 1),
                               ours_variant=vname, ours_command=" ".join(cmd))
            q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16)
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(be):
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        ms = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                    row[f"{name}_ms"] = ms
                    row[name] = round(flops / ms / 1e9, 1)
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = repr(e)[:200]
            if "ours_ms" in row and "flash_ms" in row:
                row["ours_over_flash"] = round(row["flash_ms"] / row["ours_ms"], 3)
            if "ours_ms" in row and "cudnn_ms" in row:
                row["ours_over_cudnn"] = round(row["cudnn_ms"] / row["ours_ms"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(os.path.join(OUT, "softmax_bwd_compare.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    with open(os.path.join(OUT, "softmax_bwd_compare.md"), "w") as f:
        f.write(f"# softmax backward, {env['gpu']}, {env['date']}\n\n")
        f.write("| N | causal | ours (variant) ms | FA2 ms | cuDNN ms | ours TFLOP/s | ours/FA2 | ours/cuDNN |\n")
        f.write("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
        for r in rows:
            f.write(f"| {r['n']} | {r['causal']} | {r.get('ours_ms', '-')} ({r.get('ours_variant')}) | {r.get('flash_ms', '-')} | "
                    f"{r.get('cudnn_ms', '-')} | {r.get('ours', '-')} | {r.get('ours_over_flash', '-')} | "
                    f"{r.get('ours_over_cudnn', '-')} |\n")


if __name__ == "__main__":
    main()
