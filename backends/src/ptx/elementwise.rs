//! Small element-wise kernels that an SP plan runs between the Tile kernels: the decayed
//! prefix sum of linear-attention states (`prefix_combine` in a plan) and the cumulative
//! decay of a chunk. They touch a few MiB once, so they are plain grid-stride loops
//! written directly in PTX rather than Tile programs.

use super::{Target, PTX_VERSION};

/// Threads per CTA of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// `einattn_prefix_combine`: for every element `i < n` of one state,
/// `acc = init ? init[i] : init_value; for s in first..first + count:
///  acc = decay[s * decay_stride + (i / decay_div) % decay_mod] * acc + slots[s * slot_stride + i];
///  out[i] = acc` (f32 throughout; pointers already offset to the state and its decay).
///
/// Parameters, in order: `slots: u64, slot_stride: u64, first: u32, count: u32, decay: u64,
/// decay_stride: u64, decay_div: u64, decay_mod: u64, init: u64 (0 = none),
/// init_value: f32, out: u64, n: u64`.
pub fn prefix_combine_ptx(target: Target) -> String {
    format!(
        r#".version {PTX_VERSION}
.target {target}
.address_size 64

.visible .entry einattn_prefix_combine(
    .param .u64 p_slots,
    .param .u64 p_slot_stride,
    .param .u32 p_first,
    .param .u32 p_count,
    .param .u64 p_decay,
    .param .u64 p_decay_stride,
    .param .u64 p_decay_div,
    .param .u64 p_decay_mod,
    .param .u64 p_init,
    .param .f32 p_init_value,
    .param .u64 p_out,
    .param .u64 p_n
)
{{
    .reg .pred %p<4>;
    .reg .b32 %r<10>;
    .reg .b64 %rd<32>;
    .reg .f32 %f<6>;

    ld.param.u64 %rd1, [p_slots];
    ld.param.u64 %rd2, [p_slot_stride];
    ld.param.u32 %r1, [p_first];
    ld.param.u32 %r2, [p_count];
    ld.param.u64 %rd3, [p_decay];
    ld.param.u64 %rd4, [p_decay_stride];
    ld.param.u64 %rd5, [p_decay_div];
    ld.param.u64 %rd6, [p_decay_mod];
    ld.param.u64 %rd7, [p_init];
    ld.param.f32 %f1, [p_init_value];
    ld.param.u64 %rd8, [p_out];
    ld.param.u64 %rd9, [p_n];
    cvta.to.global.u64 %rd1, %rd1;
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
}}
"#,
        target = target.name()
    )
}

/// `einattn_chunk_decay`: `out[i] = 2^(rate[i] * scale)` for `i < n`, with
/// `scale = -log2(e) x tokens`: the cumulative per-head decay `exp(-rate tokens)` of a
/// chunk of `tokens` positions. Parameters: `rate: u64, out: u64, n: u32, scale: f32`.
pub fn chunk_decay_ptx(target: Target) -> String {
    format!(
        r#".version {PTX_VERSION}
.target {target}
.address_size 64

.visible .entry einattn_chunk_decay(
    .param .u64 p_rate,
    .param .u64 p_out,
    .param .u32 p_n,
    .param .f32 p_scale
)
{{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<8>;
    .reg .f32 %f<4>;

    ld.param.u64 %rd1, [p_rate];
    ld.param.u64 %rd2, [p_out];
    ld.param.u32 %r1, [p_n];
    ld.param.f32 %f1, [p_scale];
    cvta.to.global.u64 %rd1, %rd1;
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
}}
"#,
        target = target.name()
    )
}

/// Dimensions [`rearrange_ptx`] handles (leading ones padded with extent 1).
pub const REARRANGE_DIMS: usize = 6;

/// `einattn_rearrange_b{16,32}`: `dst[i] = src[sum_a idx_a(i) * src_stride[a]]` for `i < n`,
/// where `idx_a(i)` are the row-major indices of `i` over `out_shape` (the permuted shape):
/// a transpose of elements of `bits` bits. Parameters: `src: u64, dst: u64, n: u64`, then
/// `out_shape[6]: u64`, then `src_stride[6]: u64`.
pub fn rearrange_ptx(target: Target, bits: u32) -> String {
    let (ld, reg, width) = match bits {
        16 => ("ld.global.u16", "%h", 2),
        _ => ("ld.global.b32", "%w", 4),
    };
    let st = if bits == 16 {
        "st.global.u16"
    } else {
        "st.global.b32"
    };
    let d = REARRANGE_DIMS;
    let mut params = vec![
        "    .param .u64 p_src".to_string(),
        "    .param .u64 p_dst".to_string(),
        "    .param .u64 p_n".to_string(),
    ];
    params.extend((0..d).map(|a| format!("    .param .u64 p_shape{a}")));
    params.extend((0..d).map(|a| format!("    .param .u64 p_stride{a}")));
    let mut loads = String::new();
    for a in 0..d {
        loads.push_str(&format!(
            "    ld.param.u64 %rd{}, [p_shape{a}];\n    ld.param.u64 %rd{}, [p_stride{a}];\n",
            10 + a,
            20 + a
        ));
    }
    // Innermost dim first: idx = rem % shape, rem /= shape, off += idx * stride.
    let mut index = String::new();
    for a in (0..d).rev() {
        index.push_str(&format!(
            "    rem.u64 %rd7, %rd5, %rd{s};\n    div.u64 %rd5, %rd5, %rd{s};\n    mad.lo.u64 %rd6, %rd7, %rd{t}, %rd6;\n",
            s = 10 + a,
            t = 20 + a
        ));
    }
    format!(
        r#".version {PTX_VERSION}
.target {target}
.address_size 64

.visible .entry einattn_rearrange_b{bits}(
{params}
)
{{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<32>;
    .reg .b16 %h<2>;
    .reg .b32 %w<2>;

    ld.param.u64 %rd1, [p_src];
    ld.param.u64 %rd2, [p_dst];
    ld.param.u64 %rd3, [p_n];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
{loads}    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mul.wide.u32 %rd4, %r1, %r2;
    cvt.u64.u32 %rd8, %r3;
    add.u64 %rd4, %rd4, %rd8;
    mul.wide.u32 %rd9, %r4, %r2;
ELEMENT:
    setp.ge.u64 %p1, %rd4, %rd3;
    @%p1 bra DONE;
    mov.u64 %rd5, %rd4;
    mov.u64 %rd6, 0;
{index}    mul.lo.u64 %rd6, %rd6, {width};
    add.u64 %rd6, %rd1, %rd6;
    {ld} {reg}1, [%rd6];
    mul.lo.u64 %rd8, %rd4, {width};
    add.u64 %rd8, %rd2, %rd8;
    {st} [%rd8], {reg}1;
    add.u64 %rd4, %rd4, %rd9;
    bra ELEMENT;
DONE:
    ret;
}}
"#,
        target = target.name(),
        params = params.join(",\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptx::ptxas::{assemble, ptxas_for_test};

    #[test]
    fn elementwise_kernels_assemble_for_every_target() {
        let Some(ptxas) = ptxas_for_test("elementwise_kernels_assemble_for_every_target") else {
            return;
        };
        for target in [Target::Sm80, Target::Sm90a] {
            for text in [
                prefix_combine_ptx(target),
                chunk_decay_ptx(target),
                rearrange_ptx(target, 16),
                rearrange_ptx(target, 32),
            ] {
                let report = assemble(&ptxas, &text, target.name())
                    .unwrap_or_else(|e| panic!("{}: {e}\n{text}", target.name()));
                assert!(!report.spills(), "{report:?}");
            }
        }
    }
}
