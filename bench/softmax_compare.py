"""Softmax-attention baselines on the same shapes as our kernels, in the same device call.

Runs our kernels (`einattn bench --format json` on examples/attention_mha.ein and
examples/attention_causal.ein), PyTorch SDPA (flash = FA2, cuDNN) and FlexAttention
(torch.compile) forward, bf16, B*N = 16384, H*d = 2048, N in {4096, 16384}, causal or not,
and writes $OUT/softmax_compare.json and $OUT/softmax_compare.md.
TFLOP/s = 4*B*H*N^2*d / time (halved when causal); medians (CUDA events for ours,
triton.testing.do_bench for the baselines).
Usage: python3 bench/softmax_compare.py [path/to/einattn]
"""
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import triton
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

OUT = os.environ.get("OUT", "/tmp")


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def main():
    dev = torch.cuda.get_device_properties(0)
    env = dict(gpu=dev.name, sms=dev.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               command=" ".join(sys.argv))
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except Exception as e:  # noqa: BLE001
        env["driver"] = repr(e)
    print(env, flush=True)
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"

    def ours(d, n, B, H, causal):
        example = "examples/attention_causal.ein" if causal else "examples/attention_mha.ein"
        cmd = [binary, "bench", example, "-D", f"B={B}", "-D", f"H={H}", "-D", f"N={n}",
               "-D", f"D={d}", "-D", "TILE=64", "--reps", "100", "--format", "json"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print("ours failed:", " ".join(cmd), r.stderr[-500:], flush=True)
            return None
        out = json.loads(r.stdout)
        out["command"] = " ".join(cmd)
        return out

    flex = None
    try:
        from torch.nn.attention.flex_attention import flex_attention, create_block_mask
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        print("flex unavailable", repr(e), flush=True)

    rows = []
    TOK = 16384
    for d in (128, 64):
        H = 2048 // d
        for n in (4096, 16384):
            B = TOK // n
            q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for causal in (False, True):
                flops = 4 * B * H * n * n * d / (2 if causal else 1)
                row = dict(d=d, n=n, B=B, H=H, causal=causal)
                for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(be):
                            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        row[name] = round(flops / ms / 1e9, 1)
                    except Exception as e:  # noqa: BLE001
                        row[name] = None
                        print(name, "failed", repr(e)[:200], flush=True)
                if flex is not None:
                    try:
                        bm = None
                        if causal:
                            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n)
                        t0 = time.time()
                        flex(q, k, v, block_mask=bm)
                        torch.cuda.synchronize()
                        row["flex_first_call_s"] = round(time.time() - t0, 2)
                        ms = bench(lambda: flex(q, k, v, block_mask=bm))
                        row["flex"] = round(flops / ms / 1e9, 1)
                    except Exception as e:  # noqa: BLE001
                        row["flex"] = None
                        print("flex failed", repr(e)[:200], flush=True)
                o = ours(d, n, B, H, causal)
                if o is not None:
                    # Same FLOP count as the baselines (ours counts visible pairs exactly).
                    row["ours"] = round(flops / o["median_ms"] / 1e9, 1)
                    row["ours_ms"] = o["median_ms"]
                    row["ours_kernel"] = o["kernel"]
                    row["ours_schedule"] = o["schedule"]
                    row["ours_registers"] = o["registers"]
                    row["ours_predicted_ms"] = round(o["predicted_ms"], 4)
                    row["ours_command"] = o["command"]
                    if row.get("flash"):
                        row["ours_vs_flash"] = round(row["ours"] / row["flash"], 3)
                    if row.get("cudnn"):
                        row["ours_vs_cudnn"] = round(row["ours"] / row["cudnn"], 3)
                rows.append(row)
                print(row, flush=True)
                del row
            del q, k, v
            torch.cuda.empty_cache()

    res = dict(env=env, softmax=rows)
    with open(os.path.join(OUT, "softmax_compare.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"Device: {env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, driver {env.get('driver')}; {env['date']}",
             "",
             "| d | N | B | H | causal | ours | SDPA flash | SDPA cuDNN | Flex | ours/flash | ours/cuDNN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append("| {d} | {n} | {B} | {H} | {c} | {o} | {fl} | {cu} | {fx} | {rf} | {rc} |".format(
            d=r["d"], n=r["n"], B=r["B"], H=r["H"], c="yes" if r["causal"] else "no",
            o=r.get("ours", "-"), fl=r.get("flash"), cu=r.get("cudnn"), fx=r.get("flex"),
            rf=r.get("ours_vs_flash", "-"), rc=r.get("ours_vs_cudnn", "-")))
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "softmax_compare.md"), "w") as f:
        f.write(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
