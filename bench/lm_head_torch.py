"""The torch anchor for lm_head_entropy at T=8192 D=4096 VOCAB=32768 in bf16: a cuBLAS
matmul into a bf16 logit matrix, then logsumexp and the entropy in f32 (two more passes
over T x V). Prints the median time and TFLOP/s counted as 2 T V D."""
import torch

T, D, V = 8192, 4096, 32768
h = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
w = torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * D**-0.5


def step():
    z = h @ w.t()
    lse = torch.logsumexp(z.float(), dim=1)
    p = torch.softmax(z.float(), dim=1)
    ent = lse - (p * z.float()).sum(dim=1)
    return lse, ent


def gemm():
    return h @ w.t()


for name, fn in [("torch matmul+lse+entropy", step), ("torch matmul only", gemm)]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    ms = sorted(times)[len(times) // 2]
    print(f"{name}: {ms:.3f} ms median, {2 * T * V * D / ms / 1e9:.1f} TFLOP/s")
