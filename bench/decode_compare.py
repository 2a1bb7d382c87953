"""Decoding (one query per batch and head over a long K/V cache, d=128, bf16): our
`examples/flash_decoding.ein` kernels beside SDPA's cuDNN and FlashAttention-2 backends, in
one device call. Shapes of issue 15: B=8 H=32 N=32768 and B=1 H=32 N=131072; and the same
with grouped-query attention, 32 query heads on 8 K/V heads (`examples/gqa_decoding.ein`,
whose kernel reads the 4 query heads of a K/V head as one tile's rows; SDPA with
enable_gqa); and gpt-oss's decoding, 64 query heads on 8 K/V heads with a sink logit per
query head (`examples/gqa_sink_decoding.ein`). SDPA has no sink: its anchor there is the
same attention without the sink, whose work differs by one logit per row.

Each schedule is a set of `einattn bench` flags ("default": the scheduler's own choice,
which splits the key loop across CTAs when the heads alone cannot fill the GPU). Time is the
median (CUDA events for ours, triton.testing.do_bench for SDPA); GB/s counts K and V once.
Writes $OUT/decode_compare.json and .md.
Usage: python3 bench/decode_compare.py [path/to/einattn] [NAME=FLAGS ...]
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
# (B, query heads, N, K/V heads, a sink logit per query head)
SHAPES = [(8, 32, 32768, 32, False), (1, 32, 131072, 32, False), (8, 32, 32768, 8, False),
          (1, 32, 131072, 8, False), (1, 64, 131072, 8, True), (8, 64, 32768, 8, True)]
SCHEDULES = {
    "default": "",
    "sync": "--target sm_90a --mma sync",
    "wg_m64": "--target sm_90a --mma wgmma --tile m=64",
    "wg_m128": "--target sm_90a --mma wgmma --tile m=128",
}


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"
    schedules = dict(SCHEDULES)
    if len(sys.argv) > 2:
        schedules = dict(a.split("=", 1) for a in sys.argv[2:])
    dev = torch.cuda.get_device_properties(0)
    env = dict(gpu=dev.name, torch=torch.__version__, cuda=torch.version.cuda,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               command=" ".join(sys.argv))
    print(env, flush=True)
    d = 128
    rows = []
    for b, h, n, hkv, sink in SHAPES:
        kv_bytes = 2 * b * hkv * n * d * 2
        row = dict(B=b, H=h, N=n, KV=hkv, sink=sink)
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    ms = triton.testing.do_bench(
                        lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != h),
                        warmup=50, rep=300, return_mode="median")
                row[name] = round(ms, 4)
            except Exception as e:  # noqa: BLE001
                row[name] = None
                print(name, "failed", repr(e)[:200], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
        for sname, flags in schedules.items():
            if hkv == h:
                example = ["examples/flash_decoding.ein"]
            else:
                name = "gqa_sink_decoding" if sink else "gqa_decoding"
                example = [f"examples/{name}.ein", "-D", f"GROUP={h // hkv}"]
            cmd = [binary, "bench"] + example + ["-D", f"B={b}", "-D", f"H={h}", "-D", f"N={n}",
                                                 "-D", f"D={d}", "--reps", "100",
                                                 "--format", "json"] + flags.split()
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
            except subprocess.TimeoutExpired:
                print("timed out:", " ".join(cmd), flush=True)
                row[sname] = None
                continue
            if r.returncode != 0:
                print("failed:", " ".join(cmd), r.stderr[-400:], flush=True)
                row[sname] = None
                continue
            o = json.loads(r.stdout)
            row[sname] = round(o["median_ms"], 4)
            row[sname + "_detail"] = dict(schedule=o.get("schedule"), kernels=o.get("kernels"),
                                         command=" ".join(cmd))
        row["GB"] = kv_bytes / 1e9
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("_detail")}, flush=True)
    with open(os.path.join(OUT, "decode_compare.json"), "w") as f:
        json.dump(dict(env=env, schedules=schedules, rows=rows), f, indent=1)
    names = list(schedules)
    lines = [f"Device: {env['gpu']}, torch {env['torch']}; {env['date']}; ms (cuDNN's time / ours; GB/s)", "",
             "| B | H | K/V heads | N | sink | FA2 | cuDNN | " + " | ".join(names) + " |",
             "| --- " * (7 + len(names)) + "|"]
    for r in rows:
        cells = []
        for s in names:
            t = r.get(s)
            if t is None:
                cells.append("-")
            else:
                ratio = f"{r['cudnn'] / t:.2f}x, " if r.get("cudnn") else ""
                cells.append(f"{t} ({ratio}{r['GB'] / t * 1e3:.0f} GB/s)")
        sink_cell = "yes (anchors without)" if r["sink"] else "-"
        lines.append(f"| {r['B']} | {r['H']} | {r['KV']} | {r['N']} | {sink_cell} | {r['flash']} | {r['cudnn']} | "
                     + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "decode_compare.md"), "w") as f:
        f.write(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
