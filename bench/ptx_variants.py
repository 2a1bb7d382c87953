"""Times hand-edited variants of one softmax-attention PTX kernel (ablations: a lowering
with one piece taken out), each checked against PyTorch SDPA on the same inputs.

Each PTX file is a kernel `einattn compile --emit ptx` printed for examples/attention_mha.ein
or attention_causal.ein (bf16, layout [B, N, H, D]); its grid is (N / block_m, B * H) and
its threads and dynamic shared memory are read from the `.maxntid` line and the header.
Usage: python3 bench/ptx_variants.py B H N D causal(0|1) file.ptx...
Writes cuDNN's time (SDPA, same timing loop), then one line per file: name, median ms,
TFLOP/s, ratio to cuDNN, relative error against SDPA.
"""
import ctypes
import re
import sys

import torch
import torch.nn.functional as F
from cuda.bindings import driver as cu


def check(res):
    err = res[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver error {err}")
    return res[1] if len(res) == 2 else res[1:]


def main():
    B, H, N, D, causal = (int(x) for x in sys.argv[1:6])
    files = sys.argv[6:]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=bool(causal), scale=scale).transpose(1, 2)
    flops = 4 * B * H * N * N * D / (2 if causal else 1)
    stream = cu.CUstream(torch.cuda.current_stream().cuda_stream)

    def median_ms(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    from torch.nn.attention import sdpa_kernel, SDPBackend
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=bool(causal),
                                                              scale=scale))
    cudnn = flops / ms / 1e9
    print(f"cuDNN (SDPA): {ms:.4f} ms, {cudnn:.1f} TFLOP/s", flush=True)
    for path in files:
        text = open(path).read()
        entry = re.search(r"\.entry (\w+)\(", text).group(1)
        threads = int(re.search(r"\.maxntid (\d+)", text).group(1))
        smem = int(re.search(r"dynamic smem=(\d+) bytes", text).group(1))
        block_m = int(re.search(r"block_m=(\d+)", text).group(1))
        module = check(cu.cuModuleLoadData(text.encode() + b"\0"))
        fn = check(cu.cuModuleGetFunction(module, entry.encode()))
        check(cu.cuFuncSetAttribute(
            fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem))
        o = torch.full_like(q, float("nan"))
        sn, sh, sb = H * D, D, N * H * D
        args = ((q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), N, N, H, 1)
                + (sb, sn, sh) * 4 + (scale,))
        types = ((ctypes.c_void_p,) * 4 + (ctypes.c_uint32,) * 4 + (ctypes.c_uint64,) * 12
                 + (ctypes.c_float,))

        def launch():
            check(cu.cuLaunchKernel(fn, (N + block_m - 1) // block_m, B * H, 1, threads, 1, 1,
                                    smem, stream, (args, types), 0))

        launch()
        torch.cuda.synchronize()
        rel = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = median_ms(launch)
        tf = flops / ms / 1e9
        print(f"{path.split('/')[-1]}: {ms:.4f} ms, {tf:.1f} TFLOP/s ({tf / cudnn:.3f} of cuDNN), "
              f"rel err {rel:.2e}", flush=True)


if __name__ == "__main__":
    main()
