//! GPU check and benchmark of the generated softmax-attention kernels.
//!
//! For each check configuration: print PTX from the Tile IR, load it, run on fresh random
//! inputs (output poisoned with NaN first), compare with the CPU f64 reference
//! (`||out - ref|| / ||ref|| < 2e-2`, NaN never passes; long sequences are checked on a
//! sample of rows). Then time the benchmark shapes with CUDA events and print TFLOP/s
//! (`4 B H N^2 d`, halved when causal). Writes `$OUT/ours.json` when `OUT` is set.
//!
//! Usage: `gpu_attn_check [--check-only|--bench-only] [--quick] [bm=.. bn=.. warps=.. stages=..]`

use std::fmt::Write as _;
use std::time::Instant;

use einattn_backends::ptx::PtxKernel;
use einattn_backends::reference::{alibi_slopes, relative_error};
use einattn_backends::tile::attention::AttentionBindings;
use einattn_backends::tile::{AbiRole, Elem};
use einattn_backends::{flash_attention, print_ptx, AttentionSchedule, AttentionSpec, Target};
use einattn_runtime::{DeviceBuffer, Gpu, KernelArg, LaunchDims, RuntimeError};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type BoxError = Box<dyn std::error::Error>;

#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: usize,
    heads: usize,
    kv_group: usize,
    n: usize,
    /// BHND instead of BNHD.
    bhnd: bool,
}

/// Device tensors of one call, stored as 16-bit bit patterns.
struct Device16 {
    q: DeviceBuffer<u16>,
    k: DeviceBuffer<u16>,
    v: DeviceBuffer<u16>,
    o: DeviceBuffer<u16>,
    lse: DeviceBuffer<f32>,
    slopes: DeviceBuffer<f32>,
}

fn to_bits(elem: Elem, x: f64) -> u16 {
    match elem {
        Elem::F16 => f16::from_f64(x).to_bits(),
        _ => bf16::from_f64(x).to_bits(),
    }
}
fn from_bits(elem: Elem, b: u16) -> f64 {
    match elem {
        Elem::F16 => f16::from_bits(b).to_f64(),
        _ => bf16::from_bits(b).to_f64(),
    }
}

struct Strides {
    sb: u64,
    sn: u64,
    sh: u64,
}
fn strides(s: &Shape, heads: usize, d: usize) -> Strides {
    if s.bhnd {
        Strides {
            sb: (heads * s.n * d) as u64,
            sn: d as u64,
            sh: (s.n * d) as u64,
        }
    } else {
        Strides {
            sb: (s.n * heads * d) as u64,
            sn: (heads * d) as u64,
            sh: d as u64,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn kernel_args(
    k: &PtxKernel,
    b: &AttentionBindings,
    gpu: &Gpu,
    dev: &Device16,
    s: &Shape,
    d: usize,
    scale: f32,
    softcap: f32,
) -> Vec<KernelArg> {
    let kvh = s.heads / s.kv_group;
    let sq = strides(s, s.heads, d);
    let skv = strides(s, kvh, d);
    let st = |t: einattn_backends::tile::TensorId| if t == b.k || t == b.v { &skv } else { &sq };
    k.abi
        .iter()
        .map(|p| match &p.role {
            AbiRole::TensorPtr(t) if *t == b.q => dev.q.arg(gpu),
            AbiRole::TensorPtr(t) if *t == b.k => dev.k.arg(gpu),
            AbiRole::TensorPtr(t) if *t == b.v => dev.v.arg(gpu),
            AbiRole::TensorPtr(_) => dev.o.arg(gpu),
            AbiRole::RowOutputPtr(_) => dev.lse.arg(gpu),
            AbiRole::HeadParamPtr(_) => dev.slopes.arg(gpu),
            AbiRole::QueryLen | AbiRole::KeyLen => KernelArg::U32(s.n as u32),
            AbiRole::Heads => KernelArg::U32(s.heads as u32),
            AbiRole::KvGroup => KernelArg::U32(s.kv_group as u32),
            AbiRole::StrideBatch(t) => KernelArg::U64(st(*t).sb),
            AbiRole::StrideSeq(t) => KernelArg::U64(st(*t).sn),
            AbiRole::StrideHead(t) => KernelArg::U64(st(*t).sh),
            AbiRole::Scalar(id) if Some(*id) == b.softcap => KernelArg::F32(softcap),
            AbiRole::Scalar(_) => KernelArg::F32(scale),
        })
        .collect()
}

struct HostInputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn random_inputs(
    rng: &mut ChaCha8Rng,
    elem: Elem,
    s: &Shape,
    d: usize,
) -> (HostInputs, Vec<u16>, Vec<u16>, Vec<u16>) {
    let kvh = s.heads / s.kv_group;
    let mut gen = |count: usize| -> (Vec<f64>, Vec<u16>) {
        let bits: Vec<u16> = (0..count)
            .map(|_| to_bits(elem, rng.random_range(-1.0..1.0)))
            .collect();
        (bits.iter().map(|&b| from_bits(elem, b)).collect(), bits)
    };
    let (q, qb) = gen(s.batch * s.n * s.heads * d);
    let (k, kb) = gen(s.batch * s.n * kvh * d);
    let (v, vb) = gen(s.batch * s.n * kvh * d);
    (HostInputs { q, k, v }, qb, kb, vb)
}

/// Reference rows `rows` of (batch b, head h): output `[rows][d]` and lse.
#[allow(clippy::too_many_arguments)]
fn reference_rows(
    spec: &AttentionSpec,
    s: &Shape,
    x: &HostInputs,
    b: usize,
    h: usize,
    rows: &[usize],
    scale: f64,
    softcap: f64,
    slope: f64,
) -> (Vec<f64>, Vec<f64>) {
    let d = spec.head_dim as usize;
    let kvh = s.heads / s.kv_group;
    let hk = h / s.kv_group;
    let sq = strides(s, s.heads, d);
    let skv = strides(s, kvh, d);
    let qo = |p: usize| b * sq.sb as usize + p * sq.sn as usize + h * sq.sh as usize;
    let ko = |m: usize| b * skv.sb as usize + m * skv.sn as usize + hk * skv.sh as usize;
    let masks = spec.masks();
    let mut out = Vec::with_capacity(rows.len() * d);
    let mut lses = Vec::with_capacity(rows.len());
    let mut logits = vec![f64::NEG_INFINITY; s.n];
    for &p in rows {
        let mut mx = f64::NEG_INFINITY;
        for (m, l) in logits.iter_mut().enumerate() {
            *l = f64::NEG_INFINITY;
            if !masks.iter().all(|mk| mk.allows(p as i64, m as i64)) {
                continue;
            }
            let dot: f64 = (0..d).map(|c| x.q[qo(p) + c] * x.k[ko(m) + c]).sum();
            let mut v = scale * dot;
            if spec.softcap {
                v = softcap * (v / softcap).tanh();
            }
            if spec.alibi {
                v += slope * (m as f64 - p as f64);
            }
            *l = v;
            mx = mx.max(v);
        }
        let mut acc = vec![0.0; d];
        let mut den = 0.0;
        if mx > f64::NEG_INFINITY {
            for (m, l) in logits.iter().enumerate() {
                if *l == f64::NEG_INFINITY {
                    continue;
                }
                let w = (l - mx).exp();
                den += w;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += w * x.v[ko(m) + c];
                }
            }
            for a in acc.iter_mut() {
                *a /= den;
            }
        }
        out.extend(acc);
        lses.push(if den > 0.0 {
            mx + den.ln()
        } else {
            f64::NEG_INFINITY
        });
    }
    (out, lses)
}

struct Built {
    kernel: PtxKernel,
    bind: AttentionBindings,
    gpu_kernel: einattn_runtime::Kernel,
}

fn build(gpu: &Gpu, spec: &AttentionSpec, sched: &AttentionSchedule) -> Result<Built, BoxError> {
    let (prog, bind) = flash_attention(spec, sched)?;
    let kernel = print_ptx(&prog, Target::Sm80)?;
    let gpu_kernel = gpu.load_ptx(&kernel.text, &kernel.entry)?;
    Ok(Built {
        kernel,
        bind,
        gpu_kernel,
    })
}

fn dims(k: &PtxKernel, s: &Shape) -> LaunchDims {
    LaunchDims {
        grid: k.grid(s.batch as u32, s.heads as u32, s.n as u32),
        block: (k.threads, 1, 1),
        dynamic_smem_bytes: k.dynamic_smem_bytes,
    }
}

fn upload_all(
    gpu: &Gpu,
    s: &Shape,
    d: usize,
    qb: &[u16],
    kb: &[u16],
    vb: &[u16],
) -> Result<Device16, RuntimeError> {
    Ok(Device16 {
        q: gpu.upload(qb)?,
        k: gpu.upload(kb)?,
        v: gpu.upload(vb)?,
        // Poison: all-ones bits are NaN in both bf16 and f16.
        o: gpu.filled(s.batch * s.n * s.heads * d, 0xFFFFu16)?,
        lse: gpu.filled(s.batch * s.heads * s.n, f32::NAN)?,
        slopes: gpu.upload(
            &alibi_slopes(s.heads)
                .iter()
                .map(|&x| x as f32)
                .collect::<Vec<_>>(),
        )?,
    })
}

struct CheckResult {
    name: String,
    rel_err: f64,
    lse_err: f64,
    pass: bool,
}

fn run_check(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    spec: AttentionSpec,
    sched: AttentionSchedule,
    s: Shape,
) -> Result<CheckResult, BoxError> {
    let d = spec.head_dim as usize;
    let built = build(gpu, &spec, &sched)?;
    let (x, qb, kb, vb) = random_inputs(rng, spec.elem, &s, d);
    let dev = upload_all(gpu, &s, d, &qb, &kb, &vb)?;
    let scale = rng.random_range(0.5..1.5) / (d as f64).sqrt();
    let softcap = rng.random_range(1.0..5.0);
    let scale32 = scale as f32;
    let softcap32 = softcap as f32;
    let args = kernel_args(
        &built.kernel,
        &built.bind,
        gpu,
        &dev,
        &s,
        d,
        scale32,
        softcap32,
    );
    gpu.launch(&built.gpu_kernel, dims(&built.kernel, &s), &args)?;
    gpu.synchronize()?;
    let o_bits = gpu.download(&dev.o)?;
    let lse = gpu.download(&dev.lse)?;
    let sq = strides(&s, s.heads, d);
    let slopes = alibi_slopes(s.heads);
    // Every row for short sequences; else the first and last 64 rows and 64 random ones.
    let rows: Vec<usize> = if s.n <= 1024 {
        (0..s.n).collect()
    } else {
        let mut r: Vec<usize> = (0..64).chain(s.n - 64..s.n).collect();
        r.extend((0..64).map(|_| rng.random_range(0..s.n)));
        r
    };
    let mut got = Vec::new();
    let mut want = Vec::new();
    let mut lse_err: f64 = 0.0;
    for b in 0..s.batch {
        for h in 0..s.heads {
            let (w, wl) = reference_rows(
                &spec,
                &s,
                &x,
                b,
                h,
                &rows,
                scale32 as f64,
                softcap32 as f64,
                slopes[h] as f32 as f64,
            );
            want.extend(w);
            for (i, &p) in rows.iter().enumerate() {
                let off = b * sq.sb as usize + p * sq.sn as usize + h * sq.sh as usize;
                got.extend((0..d).map(|c| from_bits(spec.elem, o_bits[off + c])));
                if spec.write_lse {
                    let g = lse[(b * s.heads + h) * s.n + p] as f64;
                    let e = if g.is_nan() {
                        f64::NAN
                    } else if g == wl[i] {
                        0.0
                    } else {
                        (g - wl[i]).abs() / (1.0 + wl[i].abs())
                    };
                    lse_err = if e.is_nan() || lse_err.is_nan() {
                        f64::NAN
                    } else {
                        lse_err.max(e)
                    };
                }
            }
        }
    }
    // Every valid output element must have been written (no poison left anywhere).
    let unwritten = o_bits
        .iter()
        .filter(|&&b| from_bits(spec.elem, b).is_nan())
        .count();
    let mut rel_err = relative_error(&got, &want);
    if unwritten > 0 {
        rel_err = f64::NAN;
    }
    let name = format!(
        "{} n={} b={} h={} g={}{}",
        built.kernel.entry,
        s.n,
        s.batch,
        s.heads,
        s.kv_group,
        if s.bhnd { " bhnd" } else { "" }
    );
    let pass = rel_err < 2e-2 && (!spec.write_lse || lse_err < 1e-2);
    Ok(CheckResult {
        name,
        rel_err,
        lse_err,
        pass,
    })
}

struct BenchResult {
    d: usize,
    n: usize,
    batch: usize,
    heads: usize,
    causal: bool,
    ms: f64,
    ms_min: f64,
    ms_max: f64,
    tflops: f64,
    regs: i32,
    local: i32,
}

fn run_bench(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    spec: AttentionSpec,
    sched: AttentionSchedule,
    s: Shape,
    reps: usize,
) -> Result<BenchResult, BoxError> {
    let d = spec.head_dim as usize;
    let built = build(gpu, &spec, &sched)?;
    let res = built.gpu_kernel.resources()?;
    let kvh = s.heads / s.kv_group;
    let mut gen = |count: usize| -> Vec<u16> {
        (0..count)
            .map(|_| to_bits(spec.elem, rng.random_range(-1.0..1.0)))
            .collect()
    };
    let qb = gen(s.batch * s.n * s.heads * d);
    let kb = gen(s.batch * s.n * kvh * d);
    let vb = gen(s.batch * s.n * kvh * d);
    let dev = upload_all(gpu, &s, d, &qb, &kb, &vb)?;
    let scale = 1.0 / (d as f32).sqrt();
    let args = kernel_args(&built.kernel, &built.bind, gpu, &dev, &s, d, scale, 30.0);
    let dm = dims(&built.kernel, &s);
    let t = gpu.time(5, reps, || gpu.launch(&built.gpu_kernel, dm, &args))?;
    // The timed runs must also have produced finite output.
    let o = gpu.download(&dev.o)?;
    if o.iter().any(|&b| from_bits(spec.elem, b).is_nan()) {
        return Err(format!(
            "benchmark output of {} has NaN/unwritten elements",
            built.kernel.entry
        )
        .into());
    }
    let mut flops = 4.0 * s.batch as f64 * s.heads as f64 * (s.n as f64).powi(2) * d as f64;
    if spec.causal {
        flops /= 2.0;
    }
    Ok(BenchResult {
        d,
        n: s.n,
        batch: s.batch,
        heads: s.heads,
        causal: spec.causal,
        ms: t.median_ms,
        ms_min: t.min_ms,
        ms_max: t.max_ms,
        tflops: flops / (t.median_ms * 1e-3) / 1e12,
        regs: res.registers,
        local: res.local_bytes,
    })
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    let num = |key: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(key).and_then(|v| v.parse::<u32>().ok()))
    };
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(RuntimeError::GpuUnavailable { reason }) => {
            eprintln!("skipping: {reason}");
            std::process::exit(2);
        }
        Err(e) => return Err(e.into()),
    };
    let device = gpu.name()?;
    let (cc_major, cc_minor) = gpu.compute_capability()?;
    println!(
        "device: {device} (sm_{cc_major}{cc_minor}, {} SMs)",
        gpu.multiprocessor_count()?
    );
    let override_sched = |mut s: AttentionSchedule| {
        if let Some(v) = num("bm=") {
            s.block_m = v;
        }
        if let Some(v) = num("bn=") {
            s.block_n = v;
        }
        if let Some(v) = num("warps=") {
            s.warps = v;
        }
        if let Some(v) = num("stages=") {
            s.stages = v;
        }
        if has("qsmem") {
            s.q_in_registers = false;
        }
        if has("qreg") {
            s.q_in_registers = true;
        }
        if has("noskip") {
            s.skip_unit_rescale = false;
        }
        s
    };
    let mut rng = ChaCha8Rng::seed_from_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    let mut json = String::from("{\n");
    let _ = writeln!(json, "  \"device\": \"{device}\",\n  \"checks\": [");
    let mut all_pass = true;
    if !has("--bench-only") {
        let mut cfgs: Vec<(AttentionSpec, Shape)> = Vec::new();
        for d in [64u32, 128] {
            for elem in [Elem::Bf16, Elem::F16] {
                for n in [128usize, 1000, 4096] {
                    for causal in [false, true] {
                        if has("--quick") && n == 4096 {
                            continue;
                        }
                        let mut sp = AttentionSpec::new(d, elem);
                        sp.causal = causal;
                        sp.write_lse = n == 1000;
                        let batch = if n >= 4096 { 1 } else { 2 };
                        cfgs.push((
                            sp,
                            Shape {
                                batch,
                                heads: 2,
                                kv_group: 1,
                                n,
                                bhnd: false,
                            },
                        ));
                    }
                }
            }
        }
        // Score modifiers and masks, layouts, grouped-query heads.
        for d in [64u32, 128] {
            let mut sp = AttentionSpec::new(d, Elem::Bf16);
            sp.causal = true;
            sp.window = Some(200);
            cfgs.push((
                sp,
                Shape {
                    batch: 1,
                    heads: 2,
                    kv_group: 1,
                    n: 1000,
                    bhnd: false,
                },
            ));
            let mut sp = AttentionSpec::new(d, Elem::Bf16);
            sp.alibi = true;
            sp.causal = d == 128;
            sp.write_lse = true;
            cfgs.push((
                sp,
                Shape {
                    batch: 1,
                    heads: 4,
                    kv_group: 1,
                    n: 1000,
                    bhnd: false,
                },
            ));
            let mut sp = AttentionSpec::new(d, Elem::F16);
            sp.softcap = true;
            sp.causal = d == 64;
            cfgs.push((
                sp,
                Shape {
                    batch: 1,
                    heads: 2,
                    kv_group: 1,
                    n: 1000,
                    bhnd: false,
                },
            ));
            let mut sp = AttentionSpec::new(d, Elem::Bf16);
            sp.causal = true;
            sp.window = Some(64);
            sp.alibi = true;
            sp.softcap = true;
            sp.write_lse = true;
            cfgs.push((
                sp,
                Shape {
                    batch: 2,
                    heads: 4,
                    kv_group: 2,
                    n: 333,
                    bhnd: true,
                },
            ));
            let sp = AttentionSpec::new(d, Elem::Bf16);
            cfgs.push((
                sp,
                Shape {
                    batch: 1,
                    heads: 4,
                    kv_group: 4,
                    n: 77,
                    bhnd: true,
                },
            ));
        }
        println!(
            "{:<70} {:>10} {:>10}  result",
            "check", "rel_err", "lse_err"
        );
        let mut first = true;
        for (spec, shape) in cfgs {
            let sched = override_sched(AttentionSchedule::default_for(&spec));
            let t0 = Instant::now();
            let r = run_check(&gpu, &mut rng, spec, sched, shape)?;
            all_pass &= r.pass;
            println!(
                "{:<70} {:>10.2e} {:>10.2e}  {} ({:.1}s)",
                r.name,
                r.rel_err,
                r.lse_err,
                if r.pass { "PASS" } else { "FAIL" },
                t0.elapsed().as_secs_f64()
            );
            let _ = write!(
                json,
                "{}    {{\"name\": \"{}\", \"rel_err\": {}, \"lse_err\": {}, \"pass\": {}}}",
                if first { "" } else { ",\n" },
                r.name,
                if r.rel_err.is_finite() {
                    format!("{:e}", r.rel_err)
                } else {
                    "null".into()
                },
                if r.lse_err.is_finite() {
                    format!("{:e}", r.lse_err)
                } else {
                    "null".into()
                },
                r.pass
            );
            first = false;
        }
        println!(
            "checks: {}",
            if all_pass { "ALL PASS" } else { "SOME FAILED" }
        );
    }
    let _ = writeln!(json, "\n  ],\n  \"bench\": [");
    if !has("--check-only") {
        let reps = num("reps=").unwrap_or(30) as usize;
        let mut rows = Vec::new();
        for d in [128u32, 64] {
            if num("only_d=").is_some_and(|x| x != d) {
                continue;
            }
            let heads = if d == 128 { 16 } else { 32 };
            for n in [4096usize, 16384] {
                if num("only_n=").is_some_and(|x| x as usize != n) {
                    continue;
                }
                for causal in [false, true] {
                    let mut spec = AttentionSpec::new(d, Elem::Bf16);
                    spec.causal = causal;
                    let sched = override_sched(AttentionSchedule::default_for(&spec));
                    let s = Shape {
                        batch: 16384 / n,
                        heads,
                        kv_group: 1,
                        n,
                        bhnd: false,
                    };
                    let r = run_bench(&gpu, &mut rng, spec, sched, s, reps)?;
                    println!(
                        "bench d={} n={} B={} H={} causal={}: {:.3} ms (min {:.3}, max {:.3}) {:.1} TFLOP/s  [{} regs, {} B local, {:?}]",
                        r.d, r.n, r.batch, r.heads, r.causal, r.ms, r.ms_min, r.ms_max, r.tflops, r.regs, r.local, sched
                    );
                    rows.push(r);
                }
            }
        }
        for (i, r) in rows.iter().enumerate() {
            let _ = write!(
                json,
                "{}    {{\"d\": {}, \"n\": {}, \"B\": {}, \"H\": {}, \"causal\": {}, \"ms\": {:.4}, \"ms_min\": {:.4}, \"ms_max\": {:.4}, \"tflops\": {:.1}, \"regs\": {}, \"local_bytes\": {}}}",
                if i == 0 { "" } else { ",\n" },
                r.d, r.n, r.batch, r.heads, r.causal, r.ms, r.ms_min, r.ms_max, r.tflops, r.regs, r.local
            );
        }
    }
    let _ = writeln!(json, "\n  ]\n}}");
    if let Ok(out) = std::env::var("OUT") {
        std::fs::write(std::path::Path::new(&out).join("ours.json"), &json)?;
    }
    if !all_pass {
        return Err("some checks failed".into());
    }
    Ok(())
}
