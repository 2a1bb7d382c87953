//! Naive softmax attention in f64: the formula the tile programs and GPU kernels are
//! checked against. Independent of the Tile IR on purpose.

use crate::family::softmax::program::{AttentionSpec, Normalization};
use crate::tile::interp::{HostTensor, Problem};

/// Host inputs of one attention call.
#[derive(Debug, Clone)]
pub struct AttentionInputs<'a> {
    pub q: &'a HostTensor,
    pub k: &'a HostTensor,
    pub v: &'a HostTensor,
    /// Values of the score's scalars, in [`crate::family::softmax::program::Score::scalars`] order.
    pub scalars: &'a [f64],
    /// One array (one value per head) per score head parameter.
    pub head_params: &'a [Vec<f64>],
    /// Position of query row 0 (masks and the score see `q_offset + row`).
    pub q_offset: usize,
    /// The per-token inputs of the value masks, in [`AttentionSpec::tokens`] order (read at
    /// memory rows).
    pub tokens: &'a [HostTensor],
}

/// Output `[B, N_q, H, value_dim]` (contiguous BNHD) and log-sum-exp `[B, H, N_q]`.
/// Rows with no visible key give zeros and `-inf`. Rows are spread over the machine's
/// threads: GPU checks at N = 4096 would otherwise wait minutes for the reference.
pub fn attention(spec: &AttentionSpec, prob: Problem, x: &AttentionInputs) -> (Vec<f64>, Vec<f64>) {
    let d = spec.value_dim as usize;
    let (bsz, h_n, n_q) = (prob.batch, prob.heads, prob.n_q);
    let mut out = vec![0.0; bsz * n_q * h_n * d];
    let mut row_lse = vec![f64::NEG_INFINITY; bsz * n_q * h_n];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows_per_thread = (bsz * n_q * h_n).div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (chunk, (out, lse)) in out
            .chunks_mut(rows_per_thread * d.max(1))
            .zip(row_lse.chunks_mut(rows_per_thread))
            .enumerate()
        {
            scope.spawn(move || {
                let first = chunk * rows_per_thread;
                for (i, (o, l)) in out.chunks_mut(d.max(1)).zip(lse.iter_mut()).enumerate() {
                    let row = first + i;
                    let (b, p, h) = (row / (n_q * h_n), (row / h_n) % n_q, row % h_n);
                    *l = attention_row(spec, prob, x, (b, p, h), o);
                }
            });
        }
    });
    let mut lse = vec![f64::NEG_INFINITY; bsz * h_n * n_q];
    for b in 0..bsz {
        for p in 0..n_q {
            for h in 0..h_n {
                lse[(b * h_n + h) * n_q + p] = row_lse[(b * n_q + p) * h_n + h];
            }
        }
    }
    (out, lse)
}

/// One query row: writes `softmax(s) V` into `out` and returns the log-sum-exp.
fn attention_row(
    spec: &AttentionSpec,
    prob: Problem,
    x: &AttentionInputs,
    row: (usize, usize, usize),
    out: &mut [f64],
) -> f64 {
    if spec.normalization == Normalization::None {
        weighted_row(spec, prob, x, row, out);
        // No normalization, no log-sum-exp.
        return f64::NAN;
    }
    let (mut mx, mut denom) = partial_row(spec, prob, x, row, out);
    let head_values: Vec<f64> = x.head_params.iter().map(|v| v[row.2]).collect();
    let (b, p, h) = row;
    let row_token = |t: crate::tile::TokenId| {
        let data = &x.tokens[t.index()];
        data.data[data.offset(b, p, h)]
    };
    if let Some(sink) = spec.sink_logit(x.scalars, &head_values, &row_token) {
        // One more logit, with no value: a row that sees no key outputs zeros.
        let joint = mx.max(sink);
        let keys = if mx == f64::NEG_INFINITY {
            0.0
        } else {
            (mx - joint).exp()
        };
        for o in out.iter_mut() {
            *o *= keys;
        }
        denom = denom * keys + (sink - joint).exp();
        mx = joint;
    }
    if mx == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    for o in out.iter_mut() {
        *o /= denom;
    }
    mx + denom.ln()
}

/// One query row of attention without normalization: `out = sum over visible keys m of
/// w(q.k_m) v_m`, the score being the weight.
fn weighted_row(
    spec: &AttentionSpec,
    prob: Problem,
    x: &AttentionInputs,
    (b, p, h): (usize, usize, usize),
    out: &mut [f64],
) {
    let hk = h / prob.kv_group;
    let dv = spec.value_dim as usize;
    for (m, w) in row_scores(spec, prob, x, (b, p, h)).into_iter().enumerate() {
        let Some(w) = w else { continue };
        let vo = x.v.offset(b, m, hk);
        for (o, v) in out.iter_mut().zip(&x.v.data[vo..vo + dv]) {
            *o += w * v;
        }
    }
}

/// The score of each key for one query row, `None` where a mask hides the key.
fn row_scores(
    spec: &AttentionSpec,
    prob: Problem,
    x: &AttentionInputs,
    (b, p, h): (usize, usize, usize),
) -> Vec<Option<f64>> {
    let d = spec.head_dim as usize;
    let hk = h / prob.kv_group;
    let masks = spec.masks();
    let head_values: Vec<f64> = x.head_params.iter().map(|v| v[h]).collect();
    let qo = x.q.offset(b, p, h);
    let pos = (p + x.q_offset) as i64;
    (0..prob.n_k)
        .map(|m| {
            if !masks.iter().all(|mk| mk.allows(pos, m as i64)) {
                return None;
            }
            let token = |t: crate::tile::TokenId, at: crate::tile::TokenAt| {
                let data = &x.tokens[t.index()];
                let n = match (at, spec.tokens[t.index()].extent) {
                    // A table over the distance (clamped as the kernel clamps it).
                    (_, Some(extent)) => at
                        .distance(pos, m as i64)
                        .map_or(0, |i| i.clamp(0, i64::from(extent) - 1) as usize),
                    (crate::tile::TokenAt::Row, None) => p,
                    (_, None) => m,
                };
                data.data[data.offset(b, n, h)]
            };
            if !spec.value_masks.iter().all(|vm| vm.keeps(token)) {
                return None;
            }
            let ko = x.k.offset(b, m, hk);
            let dot: f64 = (0..d).map(|c| x.q.data[qo + c] * x.k.data[ko + c]).sum();
            Some(
                spec.score
                    .eval(dot, (pos as f64, m as f64), x.scalars, &head_values, &token),
            )
        })
        .collect()
}

/// One query row's statistics over the keys of `x`: adds `sum_m exp(s_m - max) v_m` into
/// `out` (zeros) and returns `(max, sum_m exp(s_m - max))`; `(-inf, 0)` when no key is
/// visible.
fn partial_row(
    spec: &AttentionSpec,
    prob: Problem,
    x: &AttentionInputs,
    (b, p, h): (usize, usize, usize),
    out: &mut [f64],
) -> (f64, f64) {
    let dv = spec.value_dim as usize;
    let hk = h / prob.kv_group;
    let logits = row_scores(spec, prob, x, (b, p, h));
    let mx = logits
        .iter()
        .flatten()
        .fold(f64::NEG_INFINITY, |a, &l| a.max(l));
    if mx == f64::NEG_INFINITY {
        return (mx, 0.0);
    }
    let mut denom = 0.0;
    for (m, l) in logits.iter().enumerate() {
        let Some(l) = l else { continue };
        let w = (l - mx).exp();
        denom += w;
        let vo = x.v.offset(b, m, hk);
        for (o, v) in out.iter_mut().zip(&x.v.data[vo..vo + dv]) {
            *o += w * v;
        }
    }
    (mx, denom)
}

/// The statistics of attention over one block of keys, as a partial kernel writes them
/// (Ring Attention's partials): per row the max logit and the sum of `exp(s - max)`, each
/// `[B, H, N_q]`, and the unnormalized numerator `[B, H, N_q, value_dim]`. Query row `p` sits at
/// position `p + q_offset` and key `m` at `m`: the offset is the query block's start
/// relative to the key block's.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialStats {
    pub max: Vec<f64>,
    pub sum: Vec<f64>,
    pub num: Vec<f64>,
}

pub fn attention_partial(spec: &AttentionSpec, prob: Problem, x: &AttentionInputs) -> PartialStats {
    let d = spec.value_dim as usize;
    let (bsz, h_n, n_q) = (prob.batch, prob.heads, prob.n_q);
    let rows = bsz * h_n * n_q;
    let mut out = PartialStats {
        max: vec![f64::NEG_INFINITY; rows],
        sum: vec![0.0; rows],
        num: vec![0.0; rows * d],
    };
    for b in 0..bsz {
        for h in 0..h_n {
            for p in 0..n_q {
                let r = (b * h_n + h) * n_q + p;
                let (mx, sum) =
                    partial_row(spec, prob, x, (b, p, h), &mut out.num[r * d..(r + 1) * d]);
                out.max[r] = mx;
                out.sum[r] = sum;
            }
        }
    }
    out
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

/// Linear attention in f64 by its recurrence: `S_i = f_i S_{i-1} + k_i^T v_i`,
/// `o_i = q_i S_i`, with `f_i = exp(-decay[h])` for a per-head decay, `exp(G_i - G_{i-1})`
/// for a per-token cumulative log-gate `G` (laid out like a one-column tensor, `G_{-1} = 0`),
/// else 1; non-causal: `o_i = q_i S` with `S` over all keys. Output contiguous `[B, N, H, e]`.
pub fn linear_attention(
    spec: &crate::family::linear::program::LinearSpec,
    prob: Problem,
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    decay: Option<&[f64]>,
    gate: Option<&HostTensor>,
) -> Vec<f64> {
    let (d, e) = (spec.head_dim as usize, spec.value_dim as usize);
    let n = prob.n_q;
    let mut out = vec![0.0; prob.batch * n * prob.heads * e];
    for b in 0..prob.batch {
        for h in 0..prob.heads {
            let lam = decay.map_or(1.0, |s| (-s[h]).exp());
            let mut state = vec![0.0; d * e];
            if !spec.causal {
                // Every query sees every key: the final state serves all rows.
                for i in 0..n {
                    let (ko, vo) = (k.offset(b, i, h), v.offset(b, i, h));
                    for a in 0..d {
                        for c in 0..e {
                            state[a * e + c] += k.data[ko + a] * v.data[vo + c];
                        }
                    }
                }
            }
            for i in 0..n {
                let (ko, vo, qo) = (k.offset(b, i, h), v.offset(b, i, h), q.offset(b, i, h));
                let step = match gate {
                    Some(g) => {
                        let at = |t: usize| g.data[g.offset(b, t, h)];
                        (at(i) - if i == 0 { 0.0 } else { at(i - 1) }).exp()
                    }
                    None => lam,
                };
                for a in 0..d * usize::from(spec.causal) {
                    for c in 0..e {
                        state[a * e + c] =
                            step * state[a * e + c] + k.data[ko + a] * v.data[vo + c];
                    }
                }
                let oo = ((b * n + i) * prob.heads + h) * e;
                for c in 0..e {
                    out[oo + c] = (0..d).map(|a| q.data[qo + a] * state[a * e + c]).sum();
                }
            }
        }
    }
    out
}
