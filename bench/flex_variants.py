"""Score and mask variants against FlexAttention (torch.compile of flex_attention with a
score_mod and a causal block mask) and SDPA, forward, bf16, in one device call: ALiBi,
tanh soft-cap, a sliding window of W=256 and grouped-query attention (32 query heads on 8
K/V heads), at B=2 H=16 N=8192 d=128 causal (issue 15's shapes).

Ours is `einattn bench` on the matching example with the scheduler's choice (median of
CUDA events); the baselines' time is triton.testing.do_bench's median. TFLOP/s counts the
nominal causal work, 2*B*H*N*N*d (the same for every column, so ratios are time ratios).
Writes $OUT/flex_variants.json and .md.
Usage: python3 bench/flex_variants.py [path/to/einattn]
"""
import datetime
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

OUT = os.environ.get("OUT", "/tmp")
B, H, N, D, W = 2, 16, 8192, 128, 256


def do_bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def ours(binary, example, defines):
    cmd = [binary, "bench", f"examples/{example}.ein", "-D", f"B={B}", "-D", f"N={N}",
           "-D", f"D={D}", "-D", "TILE=64", "--reps", "100", "--format", "json"] + defines
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        print("ours failed:", " ".join(cmd), r.stderr[-400:], flush=True)
        return None, " ".join(cmd)
    return json.loads(r.stdout)["median_ms"], " ".join(cmd)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"
    flex = torch.compile(flex_attention, dynamic=False)
    scale = D ** -0.5
    flops = 2 * B * H * N * N * D
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device="cuda")
    cap = 30.0

    def causal(b, h, q, kv):
        return q >= kv

    def window(b, h, q, kv):
        return (q >= kv) & (q - kv < W)

    def alibi(score, b, h, q, kv):
        return score - slopes[h] * (q - kv)

    def softcap(score, b, h, q, kv):
        return cap * torch.tanh(score / cap)

    causal_mask = create_block_mask(causal, None, None, N, N)
    window_mask = create_block_mask(window, None, None, N, N)
    cases = [
        ("alibi", "attention_alibi", ["-D", f"H={H}"], alibi, causal_mask, H, H),
        ("softcap", "attention_softcap", ["-D", f"H={H}", "--param", f"cap={cap}",
                                          "--param", f"scale={scale}"], softcap, causal_mask, H, H),
        ("window W=256", "attention_sliding_window", ["-D", f"H={H}", "-D", f"W={W}"], None,
         window_mask, H, H),
        ("GQA 32/8", "gqa", ["-D", "H=32", "-D", "GROUP=4"], None, causal_mask, 32, 8),
    ]
    rows = []
    for name, example, defines, score_mod, mask, hq, hkv in cases:
        q = torch.randn(B, hq, N, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, hkv, N, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, hkv, N, D, device="cuda", dtype=torch.bfloat16)
        f = flops * hq // H
        row = dict(case=name)
        try:
            fn = lambda: flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale,  # noqa: E731
                              enable_gqa=hq != hkv)
            fn()
            row["flex_ms"] = do_bench(fn)
        except Exception as e:  # noqa: BLE001
            row["flex_ms"] = None
            print(name, "flex failed", repr(e)[:300], flush=True)
        if hq != hkv:
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                        scale=scale, enable_gqa=True)
            row["sdpa_ms"] = do_bench(fn)
        ms, cmd = ours(binary, example, defines)
        row.update(ours_ms=ms, command=cmd, flops=f)
        rows.append(row)
        print(row, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    with open(os.path.join(OUT, "flex_variants.json"), "w") as fh:
        json.dump(dict(env=env, rows=rows), fh, indent=1)
    lines = [f"Device: {env['gpu']}, torch {env['torch']}; {env['date']}; B={B} H={H} N={N} d={D} "
             "causal, bf16; ms (TFLOP/s, nominal causal work)", "",
             "| variant | ours | FlexAttention | SDPA | ours / Flex | ours / SDPA |",
             "| --- | --- | --- | --- | --- | --- |"]

    def cell(ms, f):
        return "-" if ms is None else f"{ms:.3f} ({f / ms / 1e9:.0f})"

    def speedup(theirs, o):
        return "-" if theirs is None or o is None else f"{theirs / o:.2f}x"

    for r in rows:
        o, fl, sd, f = r.get("ours_ms"), r.get("flex_ms"), r.get("sdpa_ms"), r["flops"]
        lines.append(f"| {r['case']} | {cell(o, f)} | {cell(fl, f)} | {cell(sd, f)} | "
                     f"{speedup(fl, o)} | {speedup(sd, o)} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "flex_variants.md"), "w") as fh:
        fh.write(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
