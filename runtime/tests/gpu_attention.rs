//! On a machine with a GPU: a generated attention kernel matches the naive f64 formula.
//! Elsewhere the test prints why it skipped (CI has no GPU).

use einattn_backends::reference::{attention, relative_error, AttentionInputs};
use einattn_backends::tile::interp::{HostTensor, Problem};
use einattn_backends::tile::{AbiRole, Elem};
use einattn_backends::{flash_attention, print_ptx, AttentionSchedule, AttentionSpec, Target};
use einattn_runtime::{Gpu, KernelArg, LaunchDims, RuntimeError};
use half::bf16;
use rand::{Rng, SeedableRng};

#[test]
fn causal_attention_matches_reference_on_gpu() {
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(RuntimeError::GpuUnavailable { reason }) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let (n, h, d) = (300usize, 2usize, 64usize);
    let mut spec = AttentionSpec::new(d as u32, Elem::Bf16);
    spec.causal = true;
    let (prog, bind) =
        flash_attention(&spec, &AttentionSchedule::default_for(&spec)).expect("builds");
    let k = print_ptx(&prog, Target::Sm80).expect("prints");
    let kernel = gpu.load_ptx(&k.text, &k.entry).expect("loads");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut gen = || -> Vec<bf16> {
        (0..n * h * d)
            .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)))
            .collect()
    };
    let (q, kk, v) = (gen(), gen(), gen());
    let dq = gpu.upload(&q).expect("upload");
    let dk = gpu.upload(&kk).expect("upload");
    let dv = gpu.upload(&v).expect("upload");
    let o = gpu.filled(n * h * d, bf16::NAN).expect("alloc");
    let scale = 1.0 / (d as f32).sqrt();
    let args: Vec<KernelArg> = k
        .abi
        .iter()
        .map(|p| match p.role {
            AbiRole::TensorPtr(t) if t == bind.q => dq.arg(&gpu),
            AbiRole::TensorPtr(t) if t == bind.k => dk.arg(&gpu),
            AbiRole::TensorPtr(t) if t == bind.v => dv.arg(&gpu),
            AbiRole::TensorPtr(_) => o.arg(&gpu),
            AbiRole::QueryLen | AbiRole::KeyLen => KernelArg::U32(n as u32),
            AbiRole::Heads => KernelArg::U32(h as u32),
            AbiRole::KvGroup => KernelArg::U32(1),
            AbiRole::StrideBatch(_) => KernelArg::U64((n * h * d) as u64),
            AbiRole::StrideSeq(_) => KernelArg::U64((h * d) as u64),
            AbiRole::StrideHead(_) => KernelArg::U64(d as u64),
            AbiRole::Scalar(_) => KernelArg::F32(scale),
            ref other => panic!("unexpected parameter {other:?}"),
        })
        .collect();
    let dims = LaunchDims {
        grid: k.grid(1, h as u32, n as u32),
        block: (k.threads, 1, 1),
        dynamic_smem_bytes: k.dynamic_smem_bytes,
    };
    gpu.launch(&kernel, dims, &args).expect("launch");
    gpu.synchronize().expect("sync");
    let got: Vec<f64> = gpu
        .download(&o)
        .expect("download")
        .iter()
        .map(|x| x.to_f64())
        .collect();
    let host = |x: &[bf16]| HostTensor::bnhd(x.iter().map(|v| v.to_f64()).collect(), n, h, d);
    let (qh, kh, vh) = (host(&q), host(&kk), host(&v));
    let inputs = AttentionInputs {
        q: &qh,
        k: &kh,
        v: &vh,
        scalars: &[scale as f64],
        head_params: &[],
        q_offset: 0,
    };
    let prob = Problem {
        batch: 1,
        heads: h,
        kv_group: 1,
        n_q: n,
        n_k: n,
    };
    let (want, _) = attention(&spec, prob, &inputs);
    let err = relative_error(&got, &want);
    assert!(err < 2e-2, "relative error {err}");
}
