"""Score and mask variants against FlexAttention (torch.compile of flex_attention with a
score_mod and a causal block mask) and SDPA, forward, bf16, in one device call: ALiBi,
tanh soft-cap, a sliding window of W=256 (plain, and with ALiBi as
examples/attention_sliding_window.ein writes it), five documents packed in each sequence
(causal within a document), grouped-query attention (32 query heads on 8 K/V heads), a
learned relative-position bias table TB[h, p - m] (T5 style), QK-norm (RMS norms of Q and
K before the score; the baselines run torch's rms_norm first, inside their timing), Q.K
192 wide against V 128 (multi-head latent attention's prefill) and differential attention
(two softmax maps over halves of 64 against one V of 128, subtracted with a per-head
lambda; the baselines make two attention calls and the difference, as the paper's code
does), at B=2 H=16 N=8192 d=128 causal, and cross-attention 1000 x 7777 at B=16 H=16 d=128 non-causal (issue 15's
shapes).

The plain window is examples/attention_sliding_window.ein without its ALiBi term, written
to $OUT/attention_window_plain.ein (FlexAttention's window case has no score_mod).

Ours is `einattn bench` on the matching example with the scheduler's choice (median of
CUDA events); the baselines' time is triton.testing.do_bench's median. TFLOP/s counts the
nominal causal work, 2*B*H*N*N*d (the same for every column, so ratios are time ratios).
Writes $OUT/flex_variants.json and .md.
Usage: [FLEX_CASES=documents,window] [OURS_ALT="--grid persistent"] python3 bench/flex_variants.py [path/to/einattn]
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


# Flags of a second run of ours per case (e.g. "--grid persistent"), beside the default.
ALT = os.environ.get("OURS_ALT", "")


def do_bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def ours(binary, example, defines):
    cmd = [binary, "bench", example, "--reps", "100", "--format", "json"] + defines
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        print("ours failed:", " ".join(cmd), r.stderr[-400:], flush=True)
        return None, " ".join(cmd)
    return json.loads(r.stdout)["median_ms"], " ".join(cmd)


def plain_window_example():
    """examples/attention_sliding_window.ein less its ALiBi bias, in $OUT."""
    src = open("examples/attention_sliding_window.ein").read()
    biased = "S[b, h, m1, m0, p]    = scale * QK[b, h, m1, m0, p] - slope[h] * (p - m)"
    assert biased in src and "param  slope[h]: f32\n" in src
    src = src.replace(biased, "S[b, h, m1, m0, p]    = scale * QK[b, h, m1, m0, p]")
    src = src.replace("param  slope[h]: f32\n", "")
    path = os.path.join(OUT, "attention_window_plain.ein")
    with open(path, "w") as fh:
        fh.write(src)
    return path


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"
    flex = torch.compile(flex_attention, dynamic=False)
    scale = D ** -0.5
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

    # Five documents packed into each sequence (the same layout in every batch); ours
    # reads their ids from an .npy file.
    lengths = [1000, 3000, 512, 2680, 1000]
    doc_id = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                     torch.tensor(lengths, device="cuda"))

    def document(b, h, q, kv):
        return (q >= kv) & (doc_id[q] == doc_id[kv])

    seg_path = os.path.join(OUT, "seg.npy")
    import numpy as np
    np.save(seg_path, doc_id.float().cpu().numpy()[None, :].repeat(B, axis=0))
    causal_mask = create_block_mask(causal, None, None, N, N)
    document_mask = create_block_mask(document, None, None, N, N)
    window_mask = create_block_mask(window, None, None, N, N)
    # A relative-position bias per head and distance (ours draws its own TB: the values
    # do not change the work).
    table = torch.randn(H, N, device="cuda")

    def relative(score, b, h, q, kv):
        return score + table[h, q - kv]

    wq = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    wk = torch.ones(D, device="cuda", dtype=torch.bfloat16)

    def qk_norm(q, k):
        return (F.rms_norm(q, (q.shape[-1],), wq, 1e-6),
                F.rms_norm(k, (k.shape[-1],), wk, 1e-6))

    seq = ["-D", f"B={B}", "-D", f"N={N}", "-D", f"D={D}", "-D", "TILE=64"]
    ex = lambda name: f"examples/{name}.ein"  # noqa: E731
    # (name, cascade, defines, score_mod, block mask, query heads, K/V heads, batch,
    #  queries, keys, causal); EXTRA gives a case's other settings: `dims` (Q.K and V
    #  head dims, default D and D), `pre` (a map of q and k the baselines run first) and
    #  `terms` (attention maps over one V, each with its own q and k, combined as
    #  A_1 - lam * A_2: differential attention).
    extra = {
        "relative bias": {},
        "QK-norm": {"pre": qk_norm},
        "MLA 192/128": {"dims": (192, 128)},
        "differential 2x64/128": {"dims": (64, 128), "terms": 2},
    }
    cases = [
        ("relative bias", ex("relative_bias"), ["-D", f"B={B}", "-D", f"N={N}", "-D", f"D={D}",
                                                "-D", f"H={H}"], relative, causal_mask, H, H,
         B, N, N, True),
        ("QK-norm", ex("qk_norm"), ["-D", f"B={B}", "-D", f"N={N}", "-D", f"D={D}",
                                    "-D", f"H={H}"], None, causal_mask, H, H, B, N, N, True),
        ("MLA 192/128", ex("attention_mla"), ["-D", f"B={B}", "-D", f"N={N}", "-D", "D=192",
                                              "-D", "DV=128", "-D", "TILE=64", "-D", f"H={H}"],
         None, causal_mask, H, H, B, N, N, True),
        ("differential 2x64/128", ex("differential_attention"),
         ["-D", f"B={B}", "-D", f"N={N}", "-D", "D=64", "-D", "DV=128", "-D", f"H={H}"],
         None, causal_mask, H, H, B, N, N, True),
        ("alibi", ex("attention_alibi"), seq + ["-D", f"H={H}"], alibi, causal_mask, H, H,
         B, N, N, True),
        ("softcap", ex("attention_softcap"), seq + ["-D", f"H={H}", "--param", f"cap={cap}",
                                                    "--param", f"scale={scale}"],
         softcap, causal_mask, H, H, B, N, N, True),
        ("window W=256", plain_window_example(), seq + ["-D", f"H={H}", "-D", f"W={W}"], None,
         window_mask, H, H, B, N, N, True),
        ("window W=256 + ALiBi", ex("attention_sliding_window"),
         seq + ["-D", f"H={H}", "-D", f"W={W}"], alibi, window_mask, H, H, B, N, N, True),
        ("documents (5)", ex("document_mask"), seq + ["-D", f"H={H}", "--input",
                                                       f"SEG={seg_path}"], None, document_mask,
         H, H, B, N, N, True),
        ("GQA 32/8", ex("gqa"), seq + ["-D", "H=32", "-D", "GROUP=4"], None, causal_mask, 32, 8,
         B, N, N, True),
        ("cross 1000 x 7777, B=16", ex("cross_attention"),
         ["-D", "B=16", "-D", f"H={H}", "-D", f"D={D}", "-D", "N=1000", "-D", "M=7777",
          "-D", "TILE=77"], None, None, H, H, 16, 1000, 7777,
         False),
    ]
    # FLEX_CASES=documents,alibi runs the cases whose names start so (default: all).
    wanted = [w for w in os.environ.get("FLEX_CASES", "").split(",") if w]
    cases = [c for c in cases if not wanted or any(c[0].startswith(w) for w in wanted)]
    rows = []
    for name, example, defines, score_mod, mask, hq, hkv, b, nq, nk, is_causal in cases:
        dk, dv = extra.get(name, {}).get("dims", (D, D))
        pre = extra.get(name, {}).get("pre", lambda q, k: (q, k))
        terms = extra.get(name, {}).get("terms", 1)
        s = dk ** -0.5
        qs = [torch.randn(b, hq, nq, dk, device="cuda", dtype=torch.bfloat16)
              for _ in range(terms)]
        ks = [torch.randn(b, hkv, nk, dk, device="cuda", dtype=torch.bfloat16)
              for _ in range(terms)]
        q, k = qs[0], ks[0]
        v = torch.randn(b, hkv, nk, dv, device="cuda", dtype=torch.bfloat16)
        lam = torch.rand(hq, 1, 1, device="cuda")

        def combined(attn):
            out = attn(qs[0], ks[0])
            for qq, kk in zip(qs[1:], ks[1:]):
                out = out - lam * attn(qq, kk)
            return out

        # Nominal work: the causal cases count half of the full product, as before.
        f = terms * 2 * b * hq * nq * nk * (dk + dv) // (2 if is_causal else 1)
        row = dict(case=name)
        try:
            def fn():
                def attn(q, k):
                    qq, kk = pre(q, k)
                    return flex(qq, kk, v, score_mod=score_mod, block_mask=mask, scale=s,
                                enable_gqa=hq != hkv)
                return combined(attn)
            fn()
            row["flex_ms"] = do_bench(fn)
        except Exception as e:  # noqa: BLE001
            row["flex_ms"] = None
            print(name, "flex failed", repr(e)[:300], flush=True)
        if hq != hkv or not is_causal or name in extra and score_mod is None:
            try:
                def fn():
                    def attn(q, k):
                        qq, kk = pre(q, k)
                        return F.scaled_dot_product_attention(qq, kk, v, is_causal=is_causal,
                                                              scale=s, enable_gqa=hq != hkv)
                    return combined(attn)
                fn()
                row["sdpa_ms"] = do_bench(fn)
            except Exception as e:  # noqa: BLE001
                print(name, "sdpa failed", repr(e)[:300], flush=True)
        ms, cmd = ours(binary, example, defines)
        row.update(ours_ms=ms, command=cmd, flops=f)
        if ALT:
            # The same kernel under other flags (OURS_ALT), in the same call.
            alt_ms, alt_cmd = ours(binary, example, defines + ALT.split())
            row.update(alt_ms=alt_ms, alt_command=alt_cmd)
        rows.append(row)
        print(row, flush=True)
        del q, k, v, qs, ks
        torch.cuda.empty_cache()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    with open(os.path.join(OUT, "flex_variants.json"), "w") as fh:
        json.dump(dict(env=env, rows=rows), fh, indent=1)
    lines = [f"Device: {env['gpu']}, torch {env['torch']}; {env['date']}; B={B} H={H} N={N} d={D} "
             "causal (cross-attention: its own shape, non-causal), bf16; ms (TFLOP/s, nominal "
             "work: half the full product when causal)", "",
             "| variant | ours | FlexAttention | SDPA | ours / Flex | ours / SDPA |",
             "| --- | --- | --- | --- | --- | --- |"]

    def cell(ms, f):
        return "-" if ms is None else f"{ms:.3f} ({f / ms / 1e9:.0f})"

    def speedup(theirs, o):
        return "-" if theirs is None or o is None else f"{theirs / o:.2f}x"

    if ALT:
        lines[2] = lines[2] + f" ours `{ALT}` | its / Flex | its / SDPA |"
        lines[3] = lines[3] + " --- | --- | --- |"
    for r in rows:
        o, fl, sd, f = r.get("ours_ms"), r.get("flex_ms"), r.get("sdpa_ms"), r["flops"]
        line = (f"| {r['case']} | {cell(o, f)} | {cell(fl, f)} | {cell(sd, f)} | "
                f"{speedup(fl, o)} | {speedup(sd, o)} |")
        if ALT:
            a = r.get("alt_ms")
            line += f" {cell(a, f)} | {speedup(fl, a)} | {speedup(sd, a)} |"
        lines.append(line)
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "flex_variants.md"), "w") as fh:
        fh.write(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
