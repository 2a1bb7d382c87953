//! Small element-wise kernels that an SP plan runs between the Tile kernels: the decayed
//! prefix sum of linear-attention states (`prefix_combine` in a plan), the cumulative
//! decay of a chunk, the run copies of a permutation (Ulysses' rearranges), and the merge
//! and finish of softmax partials (Ring Attention and TokenRing: `lse_merge`, and the
//! `epilogue` kernel). They touch
//! a few MiB once, so they are plain grid-stride loops written directly in PTX rather than
//! Tile programs. Their contracts take every parameter as a launcher-computed
//! [`Source::Argument`] and cover `work_items` threads.

use crate::abi::{ContractParam, GridAxis, LaunchContract, ParamType, Source};
pub use crate::plan::MergeKind;
use crate::ptx::{Target, PTX_VERSION};
use crate::tile::Elem;

/// Threads per CTA of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// A PTX module of one kernel: `params` as `(type, name, register)` are declared in order
/// and loaded into their registers before `body`. Every kernel here declares the same
/// register files (unused ones cost nothing).
fn module(target: Target, entry: &str, params: &[(&str, String, String)], body: &str) -> String {
    let ptx_type = |ty: &str| {
        if ty == "ptr" {
            "u64".to_string()
        } else {
            ty.to_string()
        }
    };
    let decls: Vec<String> = params
        .iter()
        .map(|(ty, name, _)| format!("    .param .{} {name}", ptx_type(ty)))
        .collect();
    let loads: String = params
        .iter()
        .map(|(ty, name, reg)| format!("    ld.param.{} {reg}, [{name}];\n", ptx_type(ty)))
        .collect();
    format!(
        ".version {PTX_VERSION}\n.target {target}\n.address_size 64\n\n.visible .entry {entry}(\n{decls}\n)\n{{\n    .reg .pred %p<4>;\n    .reg .b32 %r<12>;\n    .reg .b64 %rd<40>;\n    .reg .f32 %f<6>;\n    .reg .b16 %h<2>;\n    .reg .b32 %w<2>;\n\n{loads}{body}}}\n",
        target = target.name(),
        decls = decls.join(",\n"),
    )
}

/// The contract of a helper kernel: its parameters by name (`p_` dropped), one thread per
/// work item, at most 4096 CTAs of [`ELEMENTWISE_THREADS`].
fn helper_contract(
    target: Target,
    entry: &str,
    params: &[(&str, String, String)],
) -> LaunchContract {
    LaunchContract {
        kernel: entry.to_string(),
        ptx: format!("{entry}.ptx"),
        target: target.name().to_string(),
        block: [ELEMENTWISE_THREADS, 1, 1],
        grid: [1, 1, 1],
        grid_formula: [
            GridAxis {
                sizes: vec!["work_items".into()],
                divide_by: u64::from(ELEMENTWISE_THREADS),
                at_least: 1,
                at_most: Some(4096),
                times: 1,
            },
            GridAxis::fixed(1),
            GridAxis::fixed(1),
        ],
        dynamic_shared_bytes: 0,
        sizes: [("work_items".to_string(), 0)].into_iter().collect(),
        tensors: Vec::new(),
        scratch: Vec::new(),
        params: params
            .iter()
            .map(|(ty, name, _)| ContractParam {
                name: name.trim_start_matches("p_").to_string(),
                ty: match *ty {
                    "u32" => ParamType::U32,
                    "f32" => ParamType::F32,
                    "ptr" => ParamType::Ptr,
                    _ => ParamType::U64,
                },
                from: Source::Argument {
                    name: name.trim_start_matches("p_").to_string(),
                },
            })
            .collect(),
        requires: Vec::new(),
        family: serde_json::json!({"helper": entry}),
    }
}

/// A helper kernel's PTX text and contract.
pub type Helper = (String, LaunchContract);

/// The helper kernels an SP plan may launch: the prefix combine and the chunk decay, the
/// two rearranges when `rearrange`, and the statistics merge when `merge`.
pub fn helpers(target: Target, rearrange: bool, merge: bool) -> Vec<Helper> {
    let mut out = vec![prefix_combine(target), chunk_decay(target)];
    if rearrange {
        out.push(rearrange_kernel(target, 16));
        out.push(rearrange_kernel(target, 32));
    }
    if merge {
        out.push(lse_merge(target));
    }
    out
}

/// A parameter: PTX type (`ptr` is a `.u64` the contract calls a pointer), name, register.
fn param(ty: &str, name: &str, reg: &str) -> (&'static str, String, String) {
    let ty: &'static str = match ty {
        "u32" => "u32",
        "f32" => "f32",
        "ptr" => "ptr",
        _ => "u64",
    };
    (ty, name.to_string(), reg.to_string())
}

/// `einattn_prefix_combine`: for every element `i < n` of one state,
/// `acc = init ? init[i] : init_value; for s in first..first + count:
///  acc = decay[s * decay_stride + (i / decay_div) % decay_mod] * acc + slots[s * slot_stride + i];
///  out[i] = acc` (f32 throughout; pointers already offset to the state and its decay).
///
/// Parameters, in order: `slots: u64, slot_stride: u64, first: u32, count: u32, decay: u64,
/// decay_stride: u64, decay_div: u64, decay_mod: u64, init: u64 (0 = none),
/// init_value: f32, out: u64, n: u64`.
pub fn prefix_combine(target: Target) -> Helper {
    let params = [
        param("ptr", "p_slots", "%rd1"),
        param("u64", "p_slot_stride", "%rd2"),
        param("u32", "p_first", "%r1"),
        param("u32", "p_count", "%r2"),
        param("ptr", "p_decay", "%rd3"),
        param("u64", "p_decay_stride", "%rd4"),
        param("u64", "p_decay_div", "%rd5"),
        param("u64", "p_decay_mod", "%rd6"),
        param("ptr", "p_init", "%rd7"),
        param("f32", "p_init_value", "%f1"),
        param("ptr", "p_out", "%rd8"),
        param("u64", "p_n", "%rd9"),
    ];
    let contract = helper_contract(target, "einattn_prefix_combine", &params);
    let text = module(
        target,
        "einattn_prefix_combine",
        &params,
        r#"    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd3, %rd3;
    cvta.to.global.u64 %rd8, %rd8;
    add.u32 %r3, %r1, %r2;
    mov.u32 %r4, %ctaid.x;
    mov.u32 %r5, %ntid.x;
    mov.u32 %r6, %tid.x;
    mov.u32 %r7, %nctaid.x;
    mul.wide.u32 %rd10, %r4, %r5;
    cvt.u64.u32 %rd11, %r6;
    add.u64 %rd12, %rd10, %rd11;
    mul.wide.u32 %rd13, %r7, %r5;
    setp.eq.u64 %p2, %rd7, 0;
ELEMENT:
    setp.ge.u64 %p1, %rd12, %rd9;
    @%p1 bra DONE;
    shl.b64 %rd14, %rd12, 2;
    mov.f32 %f2, %f1;
    @%p2 bra NO_INIT;
    cvta.to.global.u64 %rd15, %rd7;
    add.u64 %rd15, %rd15, %rd14;
    ld.global.f32 %f2, [%rd15];
NO_INIT:
    div.u64 %rd16, %rd12, %rd5;
    rem.u64 %rd17, %rd16, %rd6;
    mov.u32 %r8, %r1;
SLOT:
    setp.ge.u32 %p3, %r8, %r3;
    @%p3 bra STORE;
    cvt.u64.u32 %rd18, %r8;
    mul.lo.u64 %rd19, %rd18, %rd2;
    add.u64 %rd19, %rd19, %rd12;
    shl.b64 %rd19, %rd19, 2;
    add.u64 %rd19, %rd1, %rd19;
    ld.global.f32 %f3, [%rd19];
    mul.lo.u64 %rd20, %rd18, %rd4;
    add.u64 %rd20, %rd20, %rd17;
    shl.b64 %rd20, %rd20, 2;
    add.u64 %rd20, %rd3, %rd20;
    ld.global.f32 %f4, [%rd20];
    fma.rn.f32 %f2, %f4, %f2, %f3;
    add.u32 %r8, %r8, 1;
    bra SLOT;
STORE:
    add.u64 %rd21, %rd8, %rd14;
    st.global.f32 [%rd21], %f2;
    add.u64 %rd12, %rd12, %rd13;
    bra ELEMENT;
DONE:
    ret;
"#,
    );
    (text, contract)
}

/// `einattn_chunk_decay`: `out[i] = 2^(rate[i] * scale)` for `i < n`, with
/// `scale = -log2(e) x tokens`: the cumulative per-head decay `exp(-rate tokens)` of a
/// chunk of `tokens` positions. Parameters: `rate: u64, out: u64, n: u32, scale: f32`.
pub fn chunk_decay(target: Target) -> Helper {
    let params = [
        param("ptr", "p_rate", "%rd1"),
        param("ptr", "p_out", "%rd2"),
        param("u32", "p_n", "%r1"),
        param("f32", "p_scale", "%f1"),
    ];
    let contract = helper_contract(target, "einattn_chunk_decay", &params);
    let text = module(
        target,
        "einattn_chunk_decay",
        &params,
        r#"    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    mul.wide.u32 %rd3, %r5, 4;
    add.u64 %rd4, %rd1, %rd3;
    ld.global.f32 %f2, [%rd4];
    mul.f32 %f2, %f2, %f1;
    ex2.approx.ftz.f32 %f3, %f2;
    add.u64 %rd5, %rd2, %rd3;
    st.global.f32 [%rd5], %f3;
DONE:
    ret;
"#,
    );
    (text, contract)
}

/// Outer dimensions [`rearrange_kernel`] handles after [`plan_rearrange`] fused what it could
/// (leading ones padded with extent 1).
pub const REARRANGE_DIMS: usize = 5;

/// A permutation `dst = transpose(src viewed as shape, perm)` in the form the run-copy
/// kernel takes: `dst` is `runs` contiguous runs of `run_len` elements; run `r` starts in
/// `src` at `sum_a idx_a(r) * outer_stride[a]`, with `idx_a(r)` the row-major indices of `r`
/// over `outer_shape`, and its elements are contiguous in `src` too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RearrangePlan {
    pub outer_shape: Vec<u64>,
    pub outer_stride: Vec<u64>,
    pub run_len: u64,
}

impl RearrangePlan {
    pub fn runs(&self) -> u64 {
        self.outer_shape.iter().product()
    }
}

/// Fuses the permutation's output dims that stay contiguous in the source (and drops
/// extent-1 dims), so that the innermost output dim becomes a contiguous run wherever the
/// source allows; `None` when more than [`REARRANGE_DIMS`] outer dims remain.
pub fn plan_rearrange(shape: &[u64], perm: &[usize]) -> Option<RearrangePlan> {
    let mut strides = vec![1u64; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    // (extent, source stride) per output dim, outermost first.
    let mut dims: Vec<(u64, u64)> = Vec::new();
    for &a in perm {
        let (extent, stride) = (*shape.get(a)?, strides[a]);
        if extent == 1 {
            continue;
        }
        match dims.last_mut() {
            // The previous dim steps over exactly this one: one longer dim.
            Some(prev) if prev.1 == extent * stride => *prev = (prev.0 * extent, stride),
            _ => dims.push((extent, stride)),
        }
    }
    let run_len = match dims.last() {
        Some(&(extent, 1)) => {
            dims.pop();
            extent
        }
        _ => 1,
    };
    if dims.len() > REARRANGE_DIMS {
        return None;
    }
    Some(RearrangePlan {
        outer_shape: dims.iter().map(|d| d.0).collect(),
        outer_stride: dims.iter().map(|d| d.1).collect(),
        run_len,
    })
}

/// `einattn_rearrange_b{16,32}`: copies the runs of a [`RearrangePlan`], one warp per run
/// (lanes stride over its elements, so loads and stores coalesce; the run's source offset
/// is computed once per run). Parameters: `src: u64, dst: u64, runs: u64, run_len: u64`,
/// then `outer_shape[5]: u64`, then `outer_stride[5]: u64` (leading dims padded with
/// extent 1, stride 0). Launch with 32 threads per run.
pub fn rearrange_kernel(target: Target, bits: u32) -> Helper {
    let (ld, st, reg, width) = match bits {
        16 => ("ld.global.u16", "st.global.u16", "%h", 2),
        _ => ("ld.global.b32", "st.global.b32", "%w", 4),
    };
    let d = REARRANGE_DIMS;
    let mut params = vec![
        param("ptr", "p_src", "%rd1"),
        param("ptr", "p_dst", "%rd2"),
        param("u64", "p_runs", "%rd3"),
        param("u64", "p_run_len", "%rd14"),
    ];
    params.extend((0..d).map(|a| param("u64", &format!("p_shape{a}"), &format!("%rd{}", 20 + a))));
    params.extend((0..d).map(|a| param("u64", &format!("p_stride{a}"), &format!("%rd{}", 30 + a))));
    // The run's source offset: innermost outer dim first.
    let mut index = String::new();
    for a in (0..d).rev() {
        index.push_str(&format!(
            "    rem.u64 %rd9, %rd7, %rd{s};\n    div.u64 %rd7, %rd7, %rd{s};\n    mad.lo.u64 %rd8, %rd9, %rd{t}, %rd8;\n",
            s = 20 + a,
            t = 30 + a
        ));
    }
    let body = format!(
        r#"    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mad.lo.u32 %r5, %r1, %r2, %r3;
    shr.u32 %r6, %r5, 5;
    and.b32 %r7, %r3, 31;
    mul.lo.u32 %r8, %r4, %r2;
    shr.u32 %r8, %r8, 5;
    cvt.u64.u32 %rd4, %r6;
    cvt.u64.u32 %rd5, %r8;
    cvt.u64.u32 %rd6, %r7;
RUN:
    setp.ge.u64 %p1, %rd4, %rd3;
    @%p1 bra DONE;
    mov.u64 %rd7, %rd4;
    mov.u64 %rd8, 0;
{index}    mul.lo.u64 %rd10, %rd4, %rd14;
    mov.u64 %rd11, %rd6;
ELEMENT:
    setp.ge.u64 %p2, %rd11, %rd14;
    @%p2 bra NEXT;
    add.u64 %rd12, %rd8, %rd11;
    mul.lo.u64 %rd12, %rd12, {width};
    add.u64 %rd12, %rd1, %rd12;
    {ld} {reg}1, [%rd12];
    add.u64 %rd13, %rd10, %rd11;
    mul.lo.u64 %rd13, %rd13, {width};
    add.u64 %rd13, %rd2, %rd13;
    {st} [%rd13], {reg}1;
    add.u64 %rd11, %rd11, 32;
    bra ELEMENT;
NEXT:
    add.u64 %rd4, %rd4, %rd5;
    bra RUN;
DONE:
    ret;
"#
    );
    let entry = format!("einattn_rearrange_b{bits}");
    (
        module(target, &entry, &params, &body),
        helper_contract(target, &entry, &params),
    )
}

/// The entry of [`lse_merge`].
pub const LSE_MERGE: &str = "einattn_lse_merge";

/// The `kind` argument of [`lse_merge`] for each merge rule.
pub fn merge_kind_code(kind: MergeKind) -> u32 {
    match kind {
        MergeKind::Max => 0,
        MergeKind::Min => 1,
        MergeKind::Sum => 2,
        MergeKind::RescaledSum => 3,
    }
}

/// `einattn_lse_merge`: merges one statistic of a partial (`from`) into an accumulator
/// (`into`), in place, for every element `i < n`, by `kind` ([`merge_kind_code`]): max, min,
/// sum, or the rescaled sum `into[i] = into[i] w_a + from[i] w_b` with
/// `w = exp(M_side - max(M_a, M_b))` read at `into_max[i / width]`, `from_max[i / width]`
/// (0 for a side whose max is `-inf`: it saw no key). A rescaled sum reads the maxes before
/// they merge, so a plan's merge runs its sums first and its extrema last.
///
/// Parameters: `into: u64, from: u64, into_max: u64, from_max: u64, width: u64, n: u64,
/// kind: u32` (f32 data; the max pointers are unused unless `kind` is 3).
pub fn lse_merge(target: Target) -> Helper {
    let entry = LSE_MERGE;
    let params = [
        param("ptr", "p_into", "%rd1"),
        param("ptr", "p_from", "%rd2"),
        param("ptr", "p_into_max", "%rd3"),
        param("ptr", "p_from_max", "%rd4"),
        param("u64", "p_width", "%rd5"),
        param("u64", "p_n", "%rd6"),
        param("u32", "p_kind", "%r1"),
    ];
    let body = r#"    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    cvta.to.global.u64 %rd4, %rd4;
    mov.u32 %r4, %ctaid.x;
    mov.u32 %r5, %ntid.x;
    mov.u32 %r6, %tid.x;
    mov.u32 %r7, %nctaid.x;
    mul.wide.u32 %rd10, %r4, %r5;
    cvt.u64.u32 %rd11, %r6;
    add.u64 %rd12, %rd10, %rd11;
    mul.wide.u32 %rd13, %r7, %r5;
ELEMENT:
    setp.ge.u64 %p1, %rd12, %rd6;
    @%p1 bra DONE;
    shl.b64 %rd14, %rd12, 2;
    add.u64 %rd15, %rd1, %rd14;
    add.u64 %rd16, %rd2, %rd14;
    ld.global.f32 %f0, [%rd15];
    ld.global.f32 %f1, [%rd16];
    setp.eq.u32 %p0, %r1, 3;
    @%p0 bra RESCALED;
    setp.eq.u32 %p0, %r1, 0;
    @%p0 max.f32 %f0, %f0, %f1;
    setp.eq.u32 %p0, %r1, 1;
    @%p0 min.f32 %f0, %f0, %f1;
    setp.eq.u32 %p0, %r1, 2;
    @%p0 add.f32 %f0, %f0, %f1;
    bra STORE;
RESCALED:
    div.u64 %rd17, %rd12, %rd5;
    shl.b64 %rd17, %rd17, 2;
    add.u64 %rd18, %rd3, %rd17;
    add.u64 %rd19, %rd4, %rd17;
    ld.global.f32 %f2, [%rd18];
    ld.global.f32 %f3, [%rd19];
    max.f32 %f4, %f2, %f3;
    setp.eq.f32 %p2, %f2, 0fFF800000;
    setp.eq.f32 %p3, %f3, 0fFF800000;
    sub.f32 %f2, %f2, %f4;
    mul.f32 %f2, %f2, 0f3FB8AA3B;
    ex2.approx.ftz.f32 %f2, %f2;
    @%p2 mov.f32 %f2, 0f00000000;
    sub.f32 %f3, %f3, %f4;
    mul.f32 %f3, %f3, 0f3FB8AA3B;
    ex2.approx.ftz.f32 %f3, %f3;
    @%p3 mov.f32 %f3, 0f00000000;
    mul.f32 %f0, %f0, %f2;
    fma.rn.f32 %f0, %f1, %f3, %f0;
STORE:
    st.global.f32 [%rd15], %f0;
    add.u64 %rd12, %rd12, %rd13;
    bra ELEMENT;
DONE:
    ret;
"#;
    (
        module(target, entry, &params, body),
        helper_contract(target, entry, &params),
    )
}

/// What [`lse_merge`] computes, in f64: the reference its GPU runs and the plan's CPU
/// simulation follow.
pub fn lse_merge_model(
    kind: MergeKind,
    into: &mut [f64],
    from: &[f64],
    into_max: &[f64],
    from_max: &[f64],
    width: usize,
) {
    let weight = |x: f64, m: f64| {
        if x == f64::NEG_INFINITY {
            0.0
        } else {
            (x - m).exp()
        }
    };
    for (i, (a, b)) in into.iter_mut().zip(from).enumerate() {
        *a = match kind {
            MergeKind::Max => a.max(*b),
            MergeKind::Min => a.min(*b),
            MergeKind::Sum => *a + b,
            MergeKind::RescaledSum => {
                let (ma, mb) = (into_max[i / width], from_max[i / width]);
                let m = ma.max(mb);
                *a * weight(ma, m) + b * weight(mb, m)
            }
        };
    }
}

/// The entry of [`lse_epilogue`] for an output element type.
pub fn lse_epilogue_entry(elem: Elem) -> String {
    format!("einattn_lse_epilogue_{}", elem.name())
}

/// `einattn_lse_epilogue_{bf16,f16}`: the output of merged softmax statistics,
/// `out = num / den` (0 where `den` is 0: the row saw no key), rounded to the output type.
/// Element `(b, s, h, c)` of a `[batch, seq, heads, width]` iteration reads
/// `num[b sb + s sn + h sh + c]` and `den[b sb + s sn + h sh]` with each tensor's own
/// batch, sequence and head strides (elements), and writes `out` likewise: any of the
/// cascade's layouts, with the value dim contiguous.
///
/// Parameters: `num, den, out: u64`, `batch, seq, heads, width: u64`, then the strides
/// `num_sb, num_sn, num_sh, den_sb, den_sn, den_sh, out_sb, out_sn, out_sh: u64`.
pub fn lse_epilogue(target: Target, elem: Elem) -> Result<String, String> {
    let cvt = match elem {
        Elem::Bf16 => "cvt.rn.bf16.f32",
        Elem::F16 => "cvt.rn.f16.f32",
        Elem::F32 => return Err("an epilogue writes a 16-bit output".into()),
    };
    let entry = lse_epilogue_entry(elem);
    let body = format!(
        r#"    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    mul.lo.u64 %rd20, %rd4, %rd5;
    mul.lo.u64 %rd20, %rd20, %rd6;
    mul.lo.u64 %rd20, %rd20, %rd7;
    mov.u32 %r4, %ctaid.x;
    mov.u32 %r5, %ntid.x;
    mov.u32 %r6, %tid.x;
    mov.u32 %r7, %nctaid.x;
    mul.wide.u32 %rd21, %r4, %r5;
    cvt.u64.u32 %rd22, %r6;
    add.u64 %rd23, %rd21, %rd22;
    mul.wide.u32 %rd24, %r7, %r5;
ELEMENT:
    setp.ge.u64 %p1, %rd23, %rd20;
    @%p1 bra DONE;
    rem.u64 %rd25, %rd23, %rd7;
    div.u64 %rd26, %rd23, %rd7;
    rem.u64 %rd27, %rd26, %rd6;
    div.u64 %rd26, %rd26, %rd6;
    rem.u64 %rd28, %rd26, %rd5;
    div.u64 %rd29, %rd26, %rd5;
    mul.lo.u64 %rd30, %rd29, %rd11;
    mad.lo.u64 %rd30, %rd28, %rd12, %rd30;
    mad.lo.u64 %rd30, %rd27, %rd13, %rd30;
    mul.lo.u64 %rd31, %rd29, %rd8;
    mad.lo.u64 %rd31, %rd28, %rd9, %rd31;
    mad.lo.u64 %rd31, %rd27, %rd10, %rd31;
    add.u64 %rd31, %rd31, %rd25;
    mul.lo.u64 %rd32, %rd29, %rd14;
    mad.lo.u64 %rd32, %rd28, %rd15, %rd32;
    mad.lo.u64 %rd32, %rd27, %rd16, %rd32;
    add.u64 %rd32, %rd32, %rd25;
    shl.b64 %rd30, %rd30, 2;
    add.u64 %rd30, %rd2, %rd30;
    ld.global.f32 %f1, [%rd30];
    shl.b64 %rd31, %rd31, 2;
    add.u64 %rd31, %rd1, %rd31;
    ld.global.f32 %f0, [%rd31];
    div.rn.f32 %f2, %f0, %f1;
    setp.eq.f32 %p2, %f1, 0f00000000;
    @%p2 mov.f32 %f2, 0f00000000;
    {cvt} %h0, %f2;
    shl.b64 %rd32, %rd32, 1;
    add.u64 %rd32, %rd3, %rd32;
    st.global.b16 [%rd32], %h0;
    add.u64 %rd23, %rd23, %rd24;
    bra ELEMENT;
DONE:
    ret;
"#
    );
    Ok(module(target, &entry, &lse_epilogue_params(), &body))
}

/// The `.entry` parameters of [`lse_epilogue`], in order: (type, name, register).
pub fn lse_epilogue_params() -> Vec<(&'static str, String, String)> {
    let mut params = vec![
        param("ptr", "p_num", "%rd1"),
        param("ptr", "p_den", "%rd2"),
        param("ptr", "p_out", "%rd3"),
        param("u64", "p_batch", "%rd4"),
        param("u64", "p_seq", "%rd5"),
        param("u64", "p_heads", "%rd6"),
        param("u64", "p_width", "%rd7"),
    ];
    for (i, t) in ["num", "den", "out"].iter().enumerate() {
        for (j, axis) in ["sb", "sn", "sh"].iter().enumerate() {
            params.push(param(
                "u64",
                &format!("p_{t}_{axis}"),
                &format!("%rd{}", 8 + 3 * i + j),
            ));
        }
    }
    params
}

/// What [`lse_epilogue`] computes for rows stored contiguously (`den` one value per row of
/// `width` numerators), in f64 before rounding.
pub fn lse_epilogue_model(num: &[f64], den: &[f64], width: usize) -> Vec<f64> {
    num.iter()
        .enumerate()
        .map(|(i, x)| {
            let d = den[i / width];
            if d == 0.0 {
                0.0
            } else {
                x / d
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptx::ptxas::{assemble, ptxas_for_test};

    /// The kernel's loops, in Rust: what `rearrange_kernel` computes for a plan.
    fn run_copy(plan: &RearrangePlan, src: &[u32]) -> Vec<u32> {
        let pad = REARRANGE_DIMS - plan.outer_shape.len();
        let shape: Vec<u64> = std::iter::repeat_n(1, pad)
            .chain(plan.outer_shape.iter().copied())
            .collect();
        let stride: Vec<u64> = std::iter::repeat_n(0, pad)
            .chain(plan.outer_stride.iter().copied())
            .collect();
        let mut dst = vec![u32::MAX; (plan.runs() * plan.run_len) as usize];
        for r in 0..plan.runs() {
            let (mut rest, mut base) = (r, 0);
            for a in (0..REARRANGE_DIMS).rev() {
                base += (rest % shape[a]) * stride[a];
                rest /= shape[a];
            }
            for j in 0..plan.run_len {
                dst[(r * plan.run_len + j) as usize] = src[(base + j) as usize];
            }
        }
        dst
    }

    fn naive(shape: &[u64], perm: &[usize], src: &[u32]) -> Vec<u32> {
        let n: u64 = shape.iter().product();
        let mut strides = vec![1u64; shape.len()];
        for a in (0..shape.len().saturating_sub(1)).rev() {
            strides[a] = strides[a + 1] * shape[a + 1];
        }
        let out: Vec<u64> = perm.iter().map(|&a| shape[a]).collect();
        (0..n)
            .map(|i| {
                let (mut rest, mut off) = (i, 0);
                for a in (0..out.len()).rev() {
                    off += (rest % out[a]) * strides[perm[a]];
                    rest /= out[a];
                }
                src[off as usize]
            })
            .collect()
    }

    #[test]
    fn run_copy_plans_transpose_like_the_definition() {
        // Ulysses' packings (group of heads to the front and back) and general transposes,
        // with extent-1 dims and runs of one element.
        let cases: Vec<(Vec<u64>, Vec<usize>)> = vec![
            (vec![1, 512, 2, 2, 64], vec![2, 0, 1, 3, 4]),
            (vec![2, 1, 512, 2, 64], vec![1, 0, 2, 3, 4]),
            (vec![1, 2, 512, 2, 64], vec![1, 0, 2, 3, 4]),
            (vec![2, 1, 512, 2, 64], vec![1, 2, 0, 3, 4]),
            (vec![3, 4, 5], vec![2, 1, 0]),
            (vec![3, 4, 5, 6], vec![0, 1, 2, 3]),
            (vec![2, 3, 1, 4, 5, 2], vec![5, 3, 1, 0, 2, 4]),
            (vec![7], vec![0]),
        ];
        for (shape, perm) in cases {
            let n: u64 = shape.iter().product();
            let src: Vec<u32> = (0..n as u32).collect();
            let plan = plan_rearrange(&shape, &perm).expect("plans");
            assert_eq!(
                run_copy(&plan, &src),
                naive(&shape, &perm, &src),
                "{shape:?} {perm:?}"
            );
        }
        // Ulysses keeps the head dim innermost: runs are whole rows of d elements or more.
        let plan = plan_rearrange(&[1, 512, 2, 2, 64], &[2, 0, 1, 3, 4]).expect("plans");
        assert_eq!((plan.run_len, plan.outer_shape.len()), (128, 2));
        assert_eq!(plan_rearrange(&[3], &[1]), None);
    }

    proptest::proptest! {
        /// Any permutation of up to six dims that leaves at most five outer dims copies
        /// like the definition.
        #[test]
        fn run_copy_plans_match_the_definition(
            shape in proptest::collection::vec(1u64..4, 1..7),
            keys in proptest::collection::vec(0u32..1000, 6),
        ) {
            let mut perm: Vec<usize> = (0..shape.len()).collect();
            perm.sort_by_key(|&a| keys[a]);
            let n: u64 = shape.iter().product();
            let src: Vec<u32> = (0..n as u32).collect();
            if let Some(plan) = plan_rearrange(&shape, &perm) {
                proptest::prop_assert_eq!(run_copy(&plan, &src), naive(&shape, &perm, &src));
            }
        }
    }

    #[test]
    fn elementwise_kernels_assemble_for_every_target() {
        let Some(ptxas) = ptxas_for_test("elementwise_kernels_assemble_for_every_target") else {
            return;
        };
        for target in [Target::Sm80, Target::Sm90a] {
            for text in [
                prefix_combine(target).0,
                chunk_decay(target).0,
                rearrange_kernel(target, 16).0,
                rearrange_kernel(target, 32).0,
                lse_merge(target).0,
                lse_epilogue(target, Elem::Bf16).expect("bf16"),
                lse_epilogue(target, Elem::F16).expect("f16"),
            ] {
                let report = assemble(&ptxas, &text, target.name())
                    .unwrap_or_else(|e| panic!("{}: {e}\n{text}", target.name()));
                assert!(!report.spills(), "{report:?}");
            }
        }
    }
}
