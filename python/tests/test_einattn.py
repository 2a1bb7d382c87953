"""The einattn package without a GPU: compile, sizes from shapes, analyze, run, errors.

Run from the repository root: `python -m pytest python/tests`. Tests that need PyTorch skip
without it; nothing here needs a GPU (python/tests/device_check.py is the GPU check).
"""

import json
import math
import pathlib

import numpy as np
import pytest

import einattn

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def example(name):
    return str(EXAMPLES / name)


def test_compile_reads_the_signature():
    attn = einattn.compile(example("attention_causal.ein"), D=128)
    assert attn.name == "attention_causal"
    assert attn.tensor_names == ["Q", "K", "V"]
    assert attn.scalar_defaults == {"scale": 0.125}
    assert attn.output_names == ["O"]
    q = attn.signature["tensors"][0]
    assert q["dims"] == ["B", "N", "H", "D"] and q["dtype"] == "bf16"
    assert "attention_causal(Q, K, V, scale=0.125)" in repr(attn)


def test_sizes_come_from_the_shapes():
    attn = einattn.compile(example("attention_causal.ein"), D=128)
    shape = (2, 512, 4, 128)
    assert attn.sizes_for(shape, shape, shape) == {"B": 2, "D": 128, "H": 4, "N": 512}
    assert attn.output_shapes(shape, shape, shape) == {"O": shape}
    # Another head dimension than the define: the shapes win.
    small = (1, 256, 2, 64)
    assert attn.sizes_for(small, small, small)["D"] == 64


def test_kernels_compile_per_shape_without_a_gpu():
    attn = einattn.compile(example("attention_causal.ein"), D=128)
    shape = (1, 1024, 2, 128)
    hopper = attn.kernels(shape, shape, shape, dtype="bf16", capability=(9, 0))
    manifest = json.loads(hopper.manifest_json())
    assert manifest["family"] == "softmax"
    assert all(k["target"] == "sm_90a" for k in manifest["kernels"])
    assert hopper.outputs == [("O", [1, 1024, 2, 128], "bf16")]
    assert [name for name, _ in hopper.ptx()] == manifest["launch"]
    ampere = attn.kernels(shape, shape, shape, dtype="f16", capability=(8, 0))
    assert json.loads(ampere.manifest_json())["kernels"][0]["target"] == "sm_80"
    assert ampere.outputs == [("O", [1, 1024, 2, 128], "f16")]
    with pytest.raises(ValueError, match="compute capability 8.0"):
        attn.kernels(shape, shape, shape, capability=(7, 5))


def test_a_chunked_linear_compile_has_two_kernels_and_scratch():
    attn = einattn.compile(example("lightning.ein"), strategy="chunked", chunk_tokens=256)
    assert attn.tensor_names == ["Q", "K", "V", "s"]
    seq = (1, 1024, 2, 64)
    kernels = attn.kernels(seq, seq, seq, (2,), capability=(8, 0))
    assert len(json.loads(kernels.manifest_json())["launch"]) == 2
    assert [name for name, _ in kernels.scratch] == ["chunk_states"]
    assert kernels.inputs == [("Q", "bf16"), ("K", "bf16"), ("V", "bf16"), ("s", "f32")]


def test_shapes_that_disagree_are_value_errors_naming_the_tensors():
    attn = einattn.compile(example("attention_causal.ein"), D=128)
    q = (1, 512, 2, 128)
    with pytest.raises(ValueError, match=r"dimension 1 of `K` \(rank m\) is 256, but dimension 1 of `Q` \(rank p\) gave N = 512"):
        attn.sizes_for(q, (1, 256, 2, 128), q)
    with pytest.raises(ValueError, match=r"`Q` has 3 dimensions \[512, 2, 128\]; attention_causal declares Q\[b: B, p: N, h: H, e: D\]"):
        attn.sizes_for((512, 2, 128), q, q)
    with pytest.raises(ValueError, match="takes 3 tensors"):
        attn.sizes_for(q, q)


def test_a_size_the_source_cannot_take_is_a_compile_error():
    attn = einattn.compile(example("attention_causal.ein"))
    # N must split into tiles of 64.
    odd = (1, 100, 2, 64)
    with pytest.raises(einattn.CompileError) as info:
        attn.output_shapes(odd, odd, odd)
    assert "attention_causal.ein:" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_broken_source_fails_at_compile_with_file_line_column(tmp_path):
    src = tmp_path / "broken.ein"
    src.write_text(
        "kernel broken\nrank m: 64\nrank p: 64\nrank e: 16\n"
        "input Q[p, e]: bf16\ninput K[m, e]: bf16\noutput O[p]: f32\n"
        "QK[m, p] = Q[p, e] * K[m, e]\nO[p] = max[m] QK2[m, p]\n"
    )
    with pytest.raises(einattn.CompileError) as info:
        einattn.compile(src)
    message = str(info.value)
    assert f"{src}:9:15" in message
    assert "unknown tensor `QK2`" in message
    assert "^^^" in message


def test_a_missing_file_and_a_bad_size_are_clear():
    with pytest.raises(OSError, match="no_such.ein"):
        einattn.compile("no_such.ein")
    with pytest.raises(TypeError, match="non-negative integers"):
        einattn.compile(example("attention_causal.ein"), D=-1)
    with pytest.raises(TypeError, match="non-negative integers"):
        einattn.compile(example("attention_causal.ein"), D=1.5)


def test_a_cascade_too_large_to_lower_is_refused_at_compile_with_its_line():
    # Every valid cascade compiles, but the general lowering keeps intermediates in
    # memory: at these sizes rmsnorm_gemm's normalized activations take 256 GiB.
    with pytest.raises(einattn.CompileError) as info:
        einattn.compile(example("rmsnorm_gemm.ein"), T=1 << 20, D=1 << 16)
    message = str(info.value)
    assert "rmsnorm_gemm.ein:19:1" in message
    assert "over its 32 GiB limit" in message


def test_an_unused_define_warns():
    with pytest.warns(UserWarning, match="names no size symbol"):
        einattn.compile(example("attention_causal.ein"), NOPE=3)


def test_analyze_returns_the_report_as_a_dict():
    report = einattn.analyze(example("attention_3pass.ein"))
    assert isinstance(report, dict)
    text = json.dumps(report)
    assert "passes" in text
    one = einattn.analyze(example("attention_1pass.ein"), M=4096)
    assert one != report


def test_run_evaluates_the_reference_on_numpy_arrays():
    n, d = 64, 16
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, d))
    k = rng.standard_normal((n, d))
    v = rng.standard_normal((n, d))
    out = einattn.run(
        example("attention_3pass.ein"), {"Q": q, "K": k, "V": v}, M=n, D=d
    )
    s = 0.125 * q @ k.T
    p = np.exp(s - s.max(axis=1, keepdims=True))
    want = (p / p.sum(axis=1, keepdims=True)) @ v
    assert set(out) >= {"Q", "K", "V", "AV"}
    np.testing.assert_allclose(out["AV"], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(out["Q"], q)


def test_run_draws_what_is_not_given_and_checks_shapes():
    a = einattn.run(example("lightning.ein"), N=128, seed=3)
    b = einattn.run(example("lightning.ein"), N=128, seed=3)
    assert a["O"].shape == (1, 128, 2, 64)
    np.testing.assert_array_equal(a["O"], b["O"])
    assert not math.isnan(float(a["O"].sum()))
    with pytest.raises(ValueError, match=r"`Q` has shape \[2, 2\]"):
        einattn.run(example("lightning.ein"), {"Q": np.zeros((2, 2))}, N=128)
    with pytest.raises(ValueError, match="no input or parameter `X`"):
        einattn.run(example("lightning.ein"), {"X": np.zeros(2)}, N=128)


def _torch():
    return pytest.importorskip("torch")


def test_the_op_refuses_cpu_tensors_with_a_clear_error():
    torch = _torch()
    attn = einattn.compile(example("attention_causal.ein"))
    q = torch.zeros(1, 128, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="on cpu; einattn kernels run on CUDA tensors"):
        attn(q, q, q)


def test_the_op_checks_types_dtypes_layouts_and_arguments():
    torch = _torch()
    attn = einattn.compile(example("attention_causal.ein"))
    q = torch.empty(1, 128, 2, 64, dtype=torch.bfloat16, device="meta")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attn(q, np.zeros(3), q)
    with pytest.raises(TypeError, match="no tensor or scalar `temperature`"):
        attn(q, q, q, temperature=2.0)
    with pytest.raises(TypeError, match="takes at most 3 tensors"):
        attn(q, q, q, q)
    with pytest.raises(TypeError, match="needs the tensor `V`"):
        attn(q, q)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        attn(q.float(), q.float(), q.float())
    with pytest.raises(TypeError, match="`K` is torch.float16 but `Q` is torch.bfloat16"):
        attn(q, q.half(), q)
    with pytest.raises(ValueError, match=r"`K` is not contiguous .* pass `.contiguous\(\)`"):
        attn(q, q.transpose(1, 2), q)
    with pytest.raises(ValueError, match=r"`Q` has 3 dimensions"):
        attn(q[0], q, q)
    # Shapes that disagree: the compiler's message, raised by the op.
    with pytest.raises(ValueError, match="gave N = 128"):
        attn(q, torch.empty(1, 64, 2, 64, dtype=torch.bfloat16, device="meta"), q)


def test_meta_tensors_get_output_shapes_and_dtypes():
    torch = _torch()
    attn = einattn.compile(example("attention_causal.ein"))
    q = torch.empty(2, 256, 4, 64, dtype=torch.float16, device="meta")
    o = attn(q, q, q, scale=0.1)
    assert tuple(o.shape) == (2, 256, 4, 64)
    assert o.dtype == torch.float16 and o.device.type == "meta"


def test_parameter_arrays_are_tensors_by_position_or_name():
    torch = _torch()
    attn = einattn.compile(example("lightning.ein"))
    q = torch.empty(1, 256, 2, 64, dtype=torch.bfloat16, device="meta")
    s = torch.empty(2, dtype=torch.float32, device="meta")
    assert tuple(attn(q, q, q, s).shape) == (1, 256, 2, 64)
    assert tuple(attn(q, q, q, s=s).shape) == (1, 256, 2, 64)
    with pytest.raises(TypeError, match="declares it f32"):
        attn(q, q, q, s.half())
    with pytest.raises(TypeError, match="needs the tensor `s`"):
        attn(q, q, q)


def test_the_fake_implementation_works_under_fake_tensor_mode():
    torch = _torch()
    from torch._subclasses.fake_tensor import FakeTensorMode

    attn = einattn.compile(example("attention_causal.ein"))
    with FakeTensorMode():
        q = torch.empty(2, 256, 4, 64, dtype=torch.float16, device="cuda")
        (o,) = torch.ops.einattn.attention(attn._key, [q, q, q], [0.125])
    assert tuple(o.shape) == (2, 256, 4, 64)
    assert o.dtype == torch.float16


def test_backward_raises_a_clear_error():
    torch = _torch()
    attn = einattn.compile(example("attention_causal.ein"))
    q = torch.empty(1, 128, 2, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    o = attn(q, q, q)
    assert o.requires_grad
    with pytest.raises(NotImplementedError, match="does not call backward kernels yet"):
        o.sum().backward()


def test_torch_compile_traces_a_module_using_the_op_without_graph_breaks():
    torch = _torch()
    attn = einattn.compile(example("attention_causal.ein"))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64, dtype=torch.bfloat16, device="meta")

        def forward(self, q, k, v):
            o = attn(q, k, v, scale=0.125)
            return self.proj(o) + q

    block = Block()
    q = torch.empty(1, 128, 2, 64, dtype=torch.bfloat16, device="meta")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(q, q, q)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    out = torch.compile(block, backend="eager", fullgraph=True)(q, q, q)
    assert tuple(out.shape) == (1, 128, 2, 64)


def test_attention_variants_compile_per_shape_without_a_gpu():
    # Q.K 192 wide against V and O 128: the sizes come from the shapes.
    mla = einattn.compile(example("attention_mla.ein"))
    qk, vo = (1, 512, 2, 192), (1, 512, 2, 128)
    assert mla.sizes_for(qk, qk, vo)["DV"] == 128
    k = mla.kernels(qk, qk, vo, capability=(9, 0))
    assert json.loads(k.manifest_json())["family"] == "softmax"
    assert k.outputs == [("O", [1, 512, 2, 128], "bf16")]
    # A relative-position bias table is a parameter array the kernel reads.
    rb = einattn.compile(example("relative_bias.ein"))
    seq = (1, 256, 2, 64)
    k = rb.kernels(seq, seq, seq, (2, 256), capability=(8, 0))
    manifest = json.loads(k.manifest_json())
    assert manifest["family"] == "softmax"
    assert any(t["name"] == "TB" for t in manifest["kernels"][0]["tensors"])
    # QK-norm: pre-kernels write QN and KN into scratch, then the attention kernel.
    qn = einattn.compile(example("qk_norm.ein"))
    k = qn.kernels(seq, seq, seq, (64,), (64,), capability=(9, 0))
    launch = json.loads(k.manifest_json())["launch"]
    assert len(launch) == 5 and launch[-1].startswith("einattn_fwd_")
    assert {"QN", "KN"} <= {name for name, _ in k.scratch}
    # Differential attention: one attention kernel per softmax map, then their difference.
    diff = einattn.compile(example("differential_attention.ein"))
    half, v = (1, 256, 2, 64), (1, 256, 2, 128)
    k = diff.kernels(half, half, half, half, v, (2,), capability=(9, 0))
    launch = json.loads(k.manifest_json())["launch"]
    assert len(launch) == 3 and [e[-3:] for e in launch[:2]] == ["_t1", "_t2"]
    assert {"O_t1", "O_t2"} <= {name for name, _ in k.scratch}
