//! Naive softmax attention in f64: the formula the tile programs and GPU kernels are
//! checked against. Independent of the Tile IR on purpose.

use crate::tile::attention::AttentionSpec;
use crate::tile::interp::{HostTensor, Problem};

/// Host inputs of one attention call.
#[derive(Debug, Clone)]
pub struct AttentionInputs<'a> {
    pub q: &'a HostTensor,
    pub k: &'a HostTensor,
    pub v: &'a HostTensor,
    pub scale: f64,
    pub softcap: f64,
    /// One slope per head (ALiBi), used when the spec asks for it.
    pub alibi_slopes: &'a [f64],
}

/// Output `[B, N_q, H, d]` (contiguous BNHD) and log-sum-exp `[B, H, N_q]`.
/// Rows with no visible key give zeros and `-inf`.
pub fn attention(spec: &AttentionSpec, prob: Problem, x: &AttentionInputs) -> (Vec<f64>, Vec<f64>) {
    let d = spec.head_dim as usize;
    let (bsz, h_n, n_q, n_k) = (prob.batch, prob.heads, prob.n_q, prob.n_k);
    let mut out = vec![0.0; bsz * n_q * h_n * d];
    let mut lse = vec![f64::NEG_INFINITY; bsz * h_n * n_q];
    let masks = spec.masks();
    let mut logits = vec![0.0; n_k];
    for b in 0..bsz {
        for h in 0..h_n {
            let hk = h / prob.kv_group;
            for p in 0..n_q {
                let qo = x.q.offset(b, p, h);
                let mut mx = f64::NEG_INFINITY;
                for (m, l) in logits.iter_mut().enumerate() {
                    let visible = masks.iter().all(|mk| mk.allows(p as i64, m as i64));
                    if !visible {
                        *l = f64::NEG_INFINITY;
                        continue;
                    }
                    let ko = x.k.offset(b, m, hk);
                    let dot: f64 = (0..d).map(|c| x.q.data[qo + c] * x.k.data[ko + c]).sum();
                    let mut s = x.scale * dot;
                    if spec.softcap {
                        s = x.softcap * (s / x.softcap).tanh();
                    }
                    if spec.alibi {
                        s += x.alibi_slopes[h] * (m as f64 - p as f64);
                    }
                    *l = s;
                    mx = mx.max(s);
                }
                if mx == f64::NEG_INFINITY {
                    continue;
                }
                let mut denom = 0.0;
                let oo = (b * n_q + p) * h_n * d + h * d;
                for (m, l) in logits.iter().enumerate() {
                    if *l == f64::NEG_INFINITY {
                        continue;
                    }
                    let w = (l - mx).exp();
                    denom += w;
                    let vo = x.v.offset(b, m, hk);
                    for c in 0..d {
                        out[oo + c] += w * x.v.data[vo + c];
                    }
                }
                for c in 0..d {
                    out[oo + c] /= denom;
                }
                lse[(b * h_n + h) * n_q + p] = mx + denom.ln();
            }
        }
    }
    (out, lse)
}

/// `||a - b|| / ||b||` over all elements; NaN anywhere gives NaN (never passes a `<` test).
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let mut num = 0.0;
    let mut den = 0.0;
    for (x, y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::NAN;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// ALiBi slopes of the usual geometric sequence `2^(-8 (h+1) / H)`.
pub fn alibi_slopes(heads: usize) -> Vec<f64> {
    (0..heads)
        .map(|h| 2f64.powf(-8.0 * (h as f64 + 1.0) / heads as f64))
        .collect()
}
