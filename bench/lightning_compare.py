"""Lightning attention forward side by side, in one device call: ours (`einattn bench` on
examples/lightning.ein), fla `chunk_lightning_attn` and OpenNLPLab `lightning_attn2`; and the
data-dependent scalar gate: ours on examples/gated_linear.ein vs fla `chunk_simple_gla`.
B=4, H=16, d=e=128, bf16, per-head decay, N in {8192, 32768, 65536}. Mtok/s = B*N / time.
Writes $OUT/lightning_compare.json and .md. Baselines: medians of triton.testing.do_bench.
Usage: python3 bench/lightning_compare.py [path/to/einattn]   (fla, lightning_attn importable)
Kernel flags for ours (e.g. "--target sm_90a --mma wgmma") come from $EINATTN_FLAGS.
"""
import datetime
import json
import os
import subprocess
import sys

import torch
import triton

OUT = os.environ.get("OUT", "/tmp")
binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/einattn"


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def ours(n, B, H, d, dtype="bf16"):
    return ours_example("examples/lightning.ein", n, B, H, d, dtype)


def ours_example(example, n, B, H, d, dtype="bf16"):
    cmd = [binary, "bench", example, "-D", f"B={B}", "-D", f"H={H}", "-D", f"N={n}",
           "-D", f"D={d}", "-D", "BLOCK=64", "--dtype", dtype, "--reps", "50", "--format", "json"]
    cmd += os.environ.get("EINATTN_FLAGS", "").split()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print("ours failed:", " ".join(cmd), r.stderr[-800:], flush=True)
        return None
    out = json.loads(r.stdout)
    out["command"] = " ".join(cmd)
    return out


def main():
    dev = torch.cuda.get_device_properties(0)
    env = dict(gpu=dev.name, sms=dev.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               command="python3 bench/lightning_compare.py " + binary)
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn
    except Exception as e:  # noqa: BLE001
        chunk_lightning_attn = None
        print("fla import failed", repr(e), flush=True)
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001
        chunk_simple_gla = None
        print("fla simple_gla import failed", repr(e), flush=True)
    try:
        from lightning_attn.ops.triton import lightning_attn2
    except Exception as e:  # noqa: BLE001
        lightning_attn2 = None
        print("lightning_attn import failed", repr(e), flush=True)
    rows = []
    B, H, d = 4, 16, 128
    for n in (8192, 32768, 65536):
        row = dict(B=B, H=H, d=d, n=n)
        o = ours(n, B, H, d)
        if o is not None:
            row.update(ours_ms=round(o["median_ms"], 4), ours_Mtok_s=round(o["mtok_per_s"], 1),
                       ours_ns_per_token=round(o["ns_per_token"], 4),
                       ours_pct_memory_floor=o["percent_of_memory_floor"], ours_kernel=o["kernel"],
                       ours_registers=o["registers"], ours_command=o["command"])
        qb, kb, vb = (torch.randn(B, n, H, d, device="cuda", dtype=torch.bfloat16) * 0.1 for _ in range(3))
        if chunk_lightning_attn is not None:
            try:
                ms = bench(lambda: chunk_lightning_attn(qb, kb, vb, layer_idx=0, num_layers=24))
                row.update(fla_ms=round(ms, 4), fla_Mtok_s=round(B * n / ms / 1e3, 1))
            except Exception as e:  # noqa: BLE001
                row["fla_err"] = repr(e)[:300]
        if lightning_attn2 is not None:
            try:
                qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (qb, kb, vb))
                s = torch.linspace(0.01, 0.5, H, device="cuda", dtype=torch.float32).view(H, 1, 1)
                ms = bench(lambda: lightning_attn2(qh, kh, vh, s))
                row.update(la2_ms=round(ms, 4), la2_Mtok_s=round(B * n / ms / 1e3, 1))
            except Exception as e:  # noqa: BLE001
                row["la2_err"] = repr(e)[:300]
        # Data-dependent scalar gate: ours on examples/gated_linear.ein vs fla chunk_simple_gla.
        og = ours_example("examples/gated_linear.ein", n, B, H, d)
        if og is not None:
            row.update(ours_gate_Mtok_s=round(og["mtok_per_s"], 1), ours_gate_command=og["command"])
        if chunk_simple_gla is not None:
            try:
                g = torch.nn.functional.logsigmoid(torch.randn(B, n, H, device="cuda", dtype=torch.float32))
                ms = bench(lambda: chunk_simple_gla(qb, kb, vb, g=g))
                row.update(fla_gate_Mtok_s=round(B * n / ms / 1e3, 1))
            except Exception as e:  # noqa: BLE001
                row["fla_gate_err"] = repr(e)[:300]
        if row.get("ours_gate_Mtok_s") and row.get("fla_gate_Mtok_s"):
            row["ours_vs_fla_gate"] = round(row["ours_gate_Mtok_s"] / row["fla_gate_Mtok_s"], 3)
        if row.get("ours_Mtok_s") and row.get("fla_Mtok_s"):
            row["ours_vs_fla"] = round(row["ours_Mtok_s"] / row["fla_Mtok_s"], 3)
        rows.append(row)
        print(row, flush=True)
        del qb, kb, vb
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "lightning_compare.json"), "w") as f:
        json.dump(dict(env=env, lightning=rows), f, indent=1)
    lines = [f"Device: {env['gpu']}, torch {env['torch']}, triton {env['triton']}; {env['date']}", "",
             "| N | ours ms | ours Mtok/s | fla Mtok/s | lightning_attn2 Mtok/s | ours/fla | ours % of memory floor | gated: ours | fla simple_gla | ours/fla |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pct = r.get("ours_pct_memory_floor")
        lines.append(f"| {r['n']} | {r.get('ours_ms', '-')} | {r.get('ours_Mtok_s', '-')} | {r.get('fla_Mtok_s', '-')} | "
                     f"{r.get('la2_Mtok_s', '-')} | {r.get('ours_vs_fla', '-')} | {round(pct, 1) if pct else '-'} | "
                     f"{r.get('ours_gate_Mtok_s', '-')} | {r.get('fla_gate_Mtok_s', '-')} | {r.get('ours_vs_fla_gate', '-')} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "lightning_compare.md"), "w") as f:
        f.write(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
