"""Lightning attention forward + backward side by side, in one device call: ours
(`einattn bench --grad` on examples/lightning.ein: the forward's kernels, then the linear
family's backward kernels dQ, dK, dV) against fla `chunk_lightning_attn` (0.6.0) forward +
backward through autograd. B=4, H=16, d=e=128, bf16, per-head decay, N in {8192, 32768}.
Reported: forward + backward, backward alone and forward alone, in ms, and forward +
backward Mtok/s = B*N / time. fla's times are medians of triton.testing.do_bench; ours are
`einattn bench`'s medians (CUDA events around the launches, same process per N).
Writes $OUT/lightning_bwd_compare.json and .md.
Usage: python3 bench/lightning_bwd_compare.py [path/to/einattn]   (fla importable)
Kernel flags for ours (e.g. "--target sm_90a") come from $EINATTN_FLAGS.
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
    cmd = [binary, "bench", "--grad", "examples/lightning.ein", "-D", f"B={B}", "-D", f"H={H}",
           "-D", f"N={n}", "-D", f"D={d}", "-D", "BLOCK=64", "--dtype", dtype, "--reps", "50",
           "--format", "json"]
    cmd += os.environ.get("EINATTN_FLAGS", "").split()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        print("ours timed out:", " ".join(cmd), flush=True)
        return None
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
               command="python3 bench/lightning_bwd_compare.py " + binary,
               flags=os.environ.get("EINATTN_FLAGS", ""))
    try:
        import fla
        from fla.ops.lightning_attn import chunk_lightning_attn
        env["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        chunk_lightning_attn = None
        print("fla import failed", repr(e), flush=True)
    print(env, flush=True)
    rows = []
    B, H, d = 4, 16, 128
    for n in [int(x) for x in os.environ.get("NS", "8192 32768").split()]:
        row = dict(B=B, H=H, d=d, n=n)
        o = ours(n, B, H, d)
        if o is not None:
            row.update(ours_bwd_ms=round(o["median_ms"], 4), ours_kernel=o["kernel"],
                       ours_registers=o["registers"], ours_command=o["command"])
            if "forward_backward_median_ms" in o:
                fb = o["forward_backward_median_ms"]
                row.update(ours_fwd_bwd_ms=round(fb, 4), ours_fwd_ms=round(o["forward_median_ms"], 4),
                           ours_fwd_bwd_Mtok_s=round(B * n / fb / 1e3, 1),
                           ours_forward_kernels=o.get("forward_kernels"))
            else:
                row["ours_fwd_bwd_note"] = o.get("forward_backward_note")
        if chunk_lightning_attn is not None:
            try:
                q, k, v = (torch.randn(B, n, H, d, device="cuda", dtype=torch.bfloat16).mul_(0.1).requires_grad_()
                           for _ in range(3))
                do = torch.randn(B, n, H, d, device="cuda", dtype=torch.bfloat16) * 0.1

                def fwd():
                    return chunk_lightning_attn(q, k, v, layer_idx=0, num_layers=24)[0]

                def fwd_bwd():
                    return torch.autograd.grad(fwd(), (q, k, v), do)

                out = fwd()
                fb = bench(fwd_bwd)
                f = bench(lambda: fwd().detach())
                bwd = bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
                row.update(fla_fwd_bwd_ms=round(fb, 4), fla_fwd_ms=round(f, 4), fla_bwd_ms=round(bwd, 4),
                           fla_fwd_bwd_Mtok_s=round(B * n / fb / 1e3, 1))
                del q, k, v, do, out
            except Exception as e:  # noqa: BLE001
                row["fla_err"] = repr(e)[:300]
        if row.get("ours_fwd_bwd_ms") and row.get("fla_fwd_bwd_ms"):
            row["ours_vs_fla_fwd_bwd"] = round(row["fla_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"], 3)
        if row.get("ours_bwd_ms") and row.get("fla_bwd_ms"):
            row["ours_vs_fla_bwd"] = round(row["fla_bwd_ms"] / row["ours_bwd_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "lightning_bwd_compare.json"), "w") as fh:
        json.dump(dict(env=env, rows=rows), fh, indent=1)
    lines = [f"# Lightning forward + backward, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
             f"fla {env.get('fla', '-')}; {env['date']}", "",
             "B=4 H=16 d=e=128 bf16, per-head decay. Speed-ups are fla time / ours (> 1: ours faster).", "",
             "| N | ours fwd+bwd ms | fla fwd+bwd ms | ours/fla fwd+bwd | ours bwd ms | fla bwd ms | ours/fla bwd | ours fwd ms | fla fwd ms | ours fwd+bwd Mtok/s | fla fwd+bwd Mtok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['n']} | {r.get('ours_fwd_bwd_ms', '-')} | {r.get('fla_fwd_bwd_ms', '-')} | "
                     f"{r.get('ours_vs_fla_fwd_bwd', '-')} | {r.get('ours_bwd_ms', '-')} | {r.get('fla_bwd_ms', '-')} | "
                     f"{r.get('ours_vs_fla_bwd', '-')} | {r.get('ours_fwd_ms', '-')} | {r.get('fla_fwd_ms', '-')} | "
                     f"{r.get('ours_fwd_bwd_Mtok_s', '-')} | {r.get('fla_fwd_bwd_Mtok_s', '-')} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "lightning_bwd_compare.md"), "w") as fh:
        fh.write(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
