//! The attention variants and other cascades of `examples/` that issue 14 asks the language
//! to express, each run by the reference interpreter at small sizes and compared with a
//! direct computation of its formula written here in plain loops.

// Loops over heads and positions index several tensors at once, as the formulas read.
#![allow(clippy::needless_range_loop)]

use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::validate::topological_order;
use einattn_ir::*;
use std::collections::HashMap;

fn compile(name: &str, defines: &[(&str, u64)]) -> Cascade {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}.ein"));
    let source = std::fs::read_to_string(&path).unwrap();
    let defines: Vec<(String, u64)> = defines.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    einattn_dsl::compile_source(name, &source, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render(name, &source)))
}

/// Inputs and parameters by name (random from `seed`, then `overrides`), and every tensor
/// after evaluation, by name.
struct Run {
    values: HashMap<String, TensorData>,
}

impl Run {
    fn new(c: &Cascade, seed: u64, overrides: &[(&str, Vec<f64>)]) -> Run {
        let mut inputs = random_inputs(c, seed);
        for (name, data) in overrides {
            let h = c
                .tensor_by_name(name)
                .unwrap_or_else(|| panic!("no `{name}`"));
            let shape = inputs[&h].shape.clone();
            assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
            inputs.insert(h, TensorData::new(shape, data.clone()));
        }
        let values = evaluate_in_order(c, &inputs, &topological_order(c)).expect("evaluates");
        assert!(
            values.nan_origins.is_empty(),
            "{}",
            values.nan_origins[0].message(c)
        );
        Run {
            values: values
                .tensors
                .into_iter()
                .map(|(h, d)| (c.tensors[h].name.clone(), d))
                .collect(),
        }
    }

    fn get(&self, name: &str) -> &[f64] {
        &self.values[name].values
    }

    fn scalar(&self, name: &str) -> f64 {
        self.get(name)[0]
    }
}

fn assert_close(got: &TensorData, want: &[f64], what: &str) {
    let got = got.stored();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "{what}: non-finite output {g}");
        num += (g - w) * (g - w);
        den += w * w;
    }
    let rel = (num / den.max(1e-300)).sqrt();
    assert!(rel < 1e-10, "{what}: relative error {rel:e}");
    assert!(den > 0.0, "{what}: the reference is all zeros");
}

/// Row-major offset into a [b, n, h, d] tensor.
fn bnhd(n: usize, h: usize, d: usize) -> impl Fn(usize, usize, usize, usize) -> usize {
    move |bi, ni, hi, di| ((bi * n + ni) * h + hi) * d + di
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Softmax-weighted sum of values over the keys a query sees: `weights(p, m)` gives the
/// logit of key m for query p (None when masked); an optional extra logit joins only the
/// normalization.
fn softmax_rows(
    n: usize,
    logit: impl Fn(usize, usize) -> Option<f64>,
    extra: Option<f64>,
) -> Vec<Vec<f64>> {
    (0..n)
        .map(|p| {
            let s: Vec<Option<f64>> = (0..n).map(|m| logit(p, m)).collect();
            let max = s
                .iter()
                .flatten()
                .copied()
                .chain(extra)
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s
                .iter()
                .map(|x| x.map_or(0.0, |x| (x - max).exp()))
                .collect();
            let total: f64 = e.iter().sum::<f64>() + extra.map_or(0.0, |x| (x - max).exp());
            e.iter().map(|x| x / total).collect()
        })
        .collect()
}

/// `sum_m w[p][m] V[b, m, hv, f]` into O[b, p, h, f].
#[allow(clippy::too_many_arguments)]
fn apply(
    out: &mut [f64],
    w: &[Vec<f64>],
    v: &[f64],
    (bi, h, hv): (usize, usize, usize),
    n: usize,
    heads: usize,
    kv_heads: usize,
    dv: usize,
) {
    let at_o = bnhd(n, heads, dv);
    let at_v = bnhd(n, kv_heads, dv);
    for (p, row) in w.iter().enumerate() {
        for f in 0..dv {
            out[at_o(bi, p, h, f)] = (0..n).map(|m| row[m] * v[at_v(bi, m, hv, f)]).sum();
        }
    }
}

fn row(
    t: &[f64],
    at: &dyn Fn(usize, usize, usize, usize) -> usize,
    b: usize,
    n: usize,
    h: usize,
    d: usize,
) -> Vec<f64> {
    (0..d).map(|x| t[at(b, n, h, x)]).collect()
}

#[test]
fn sigmoid_attention_sums_sigmoids_of_scores_without_normalizing() {
    let (n, h, d) = (9, 2, 3);
    let c = compile(
        "sigmoid_attention",
        &[("N", n as u64), ("H", h as u64), ("D", d as u64)],
    );
    let r = Run::new(&c, 1, &[]);
    let (q, k, v) = (r.get("Q"), r.get("K"), r.get("V"));
    let (scale, bias) = (r.scalar("scale"), r.scalar("bias"));
    let at = bnhd(n, h, d);
    let mut want = vec![0.0; n * h * d];
    for hi in 0..h {
        let w: Vec<Vec<f64>> = (0..n)
            .map(|p| {
                (0..n)
                    .map(|m| {
                        if m > p {
                            return 0.0;
                        }
                        let s = scale * dot(&row(q, &at, 0, p, hi, d), &row(k, &at, 0, m, hi, d))
                            + bias;
                        1.0 / (1.0 + (-s).exp())
                    })
                    .collect()
            })
            .collect();
        apply(&mut want, &w, v, (0, hi, hi), n, h, h, d);
    }
    assert_close(&r.values["O"], &want, "sigmoid_attention");
}

#[test]
fn linear_attention_with_an_elu_feature_map() {
    let (n, h, d) = (10, 2, 3);
    let c = compile(
        "linear_feature_map",
        &[("N", n as u64), ("H", h as u64), ("D", d as u64)],
    );
    let r = Run::new(&c, 2, &[]);
    let (q, k, v) = (r.get("Q"), r.get("K"), r.get("V"));
    let phi = |x: f64| if x > 0.0 { x + 1.0 } else { x.exp() };
    let at = bnhd(n, h, d);
    let mut want = vec![0.0; n * h * d];
    for hi in 0..h {
        let w: Vec<Vec<f64>> = (0..n)
            .map(|p| {
                (0..n)
                    .map(|m| {
                        if m > p {
                            return 0.0;
                        }
                        (0..d)
                            .map(|x| phi(q[at(0, p, hi, x)]) * phi(k[at(0, m, hi, x)]))
                            .sum()
                    })
                    .collect()
            })
            .collect();
        apply(&mut want, &w, v, (0, hi, hi), n, h, h, d);
    }
    assert_close(&r.values["O"], &want, "linear_feature_map");
}

#[test]
fn grouped_query_attention_shares_kv_heads_within_a_group() {
    for (heads, group) in [(4usize, 2usize), (6, 3), (4, 4)] {
        let (n, d, tile) = (8, 3, 4);
        let c = compile(
            "gqa",
            &[
                ("N", n as u64),
                ("H", heads as u64),
                ("GROUP", group as u64),
                ("D", d as u64),
                ("TILE", tile),
            ],
        );
        let r = Run::new(&c, 3, &[]);
        let (q, k, v) = (r.get("Q"), r.get("K"), r.get("V"));
        let scale = r.scalar("scale");
        let kv = heads / group;
        let (aq, ak) = (bnhd(n, heads, d), bnhd(n, kv, d));
        let mut want = vec![0.0; n * heads * d];
        for hi in 0..heads {
            let g = hi / group;
            let w = softmax_rows(
                n,
                |p, m| {
                    (m <= p)
                        .then(|| scale * dot(&row(q, &aq, 0, p, hi, d), &row(k, &ak, 0, m, g, d)))
                },
                None,
            );
            apply(&mut want, &w, v, (0, hi, g), n, heads, kv, d);
        }
        assert_close(
            &r.values["O"],
            &want,
            &format!("gqa H={heads} GROUP={group}"),
        );
    }
}

#[test]
fn document_mask_keeps_attention_inside_each_document() {
    let (n, h, d) = (16, 2, 3);
    let c = compile(
        "document_mask",
        &[
            ("N", n as u64),
            ("H", h as u64),
            ("D", d as u64),
            ("TILE", 4),
        ],
    );
    // Documents of 3, 5, 4 and 4 tokens: the third starts on a tile boundary and the
    // second mid-tile, so later queries see whole tiles masked before their own keys.
    let seg: Vec<f64> = [3usize, 5, 4, 4]
        .iter()
        .enumerate()
        .flat_map(|(doc, &len)| std::iter::repeat_n(doc as f64, len))
        .collect();
    let r = Run::new(&c, 4, &[("SEG", seg.clone())]);
    let (q, k, v) = (r.get("Q"), r.get("K"), r.get("V"));
    let scale = r.scalar("scale");
    let at = bnhd(n, h, d);
    let mut want = vec![0.0; n * h * d];
    for hi in 0..h {
        let w = softmax_rows(
            n,
            |p, m| {
                (m <= p && seg[p] == seg[m])
                    .then(|| scale * dot(&row(q, &at, 0, p, hi, d), &row(k, &at, 0, m, hi, d)))
            },
            None,
        );
        apply(&mut want, &w, v, (0, hi, hi), n, h, h, d);
    }
    assert_close(&r.values["O"], &want, "document_mask");
}

#[test]
fn relative_bias_adds_a_table_entry_per_distance() {
    let (n, h, d) = (9, 2, 3);
    let c = compile(
        "relative_bias",
        &[("N", n as u64), ("H", h as u64), ("D", d as u64)],
    );
    let r = Run::new(&c, 5, &[]);
    let (q, k, v, tb) = (r.get("Q"), r.get("K"), r.get("V"), r.get("TB"));
    let scale = r.scalar("scale");
    let at = bnhd(n, h, d);
    let mut want = vec![0.0; n * h * d];
    for hi in 0..h {
        let w = softmax_rows(
            n,
            |p, m| {
                (m <= p).then(|| {
                    scale * dot(&row(q, &at, 0, p, hi, d), &row(k, &at, 0, m, hi, d))
                        + tb[hi * n + (p - m)]
                })
            },
            None,
        );
        apply(&mut want, &w, v, (0, hi, hi), n, h, h, d);
    }
    assert_close(&r.values["O"], &want, "relative_bias");
}

#[test]
fn differential_attention_subtracts_two_softmax_maps() {
    let (n, h, d, dv) = (8, 2, 3, 4);
    let c = compile(
        "differential_attention",
        &[
            ("N", n as u64),
            ("H", h as u64),
            ("D", d as u64),
            ("DV", dv as u64),
        ],
    );
    let r = Run::new(&c, 6, &[]);
    let (q1, k1, q2, k2, v) = (
        r.get("Q1"),
        r.get("K1"),
        r.get("Q2"),
        r.get("K2"),
        r.get("V"),
    );
    let (scale, lam) = (r.scalar("scale"), r.get("lam"));
    let at = bnhd(n, h, d);
    let mut want = vec![0.0; n * h * dv];
    for hi in 0..h {
        let map = |q: &[f64], k: &[f64]| {
            softmax_rows(
                n,
                |p, m| {
                    (m <= p)
                        .then(|| scale * dot(&row(q, &at, 0, p, hi, d), &row(k, &at, 0, m, hi, d)))
                },
                None,
            )
        };
        let (a1, a2) = (map(q1, k1), map(q2, k2));
        let w: Vec<Vec<f64>> = a1
            .iter()
            .zip(&a2)
            .map(|(r1, r2)| r1.iter().zip(r2).map(|(x, y)| x - lam[hi] * y).collect())
            .collect();
        apply(&mut want, &w, v, (0, hi, hi), n, h, h, dv);
    }
    assert_close(&r.values["O"], &want, "differential_attention");
}

#[test]
fn qk_norm_normalizes_queries_and_keys_before_the_score() {
    let (n, h, d) = (8, 2, 4);
    let c = compile(
        "qk_norm",
        &[("N", n as u64), ("H", h as u64), ("D", d as u64)],
    );
    let r = Run::new(&c, 7, &[]);
    let (q, k, v, wq, wk) = (r.get("Q"), r.get("K"), r.get("V"), r.get("wq"), r.get("wk"));
    let (scale, eps) = (r.scalar("scale"), r.scalar("eps"));
    let at = bnhd(n, h, d);
    let norm = |x: Vec<f64>, w: &[f64]| {
        let rms = (x.iter().map(|a| a * a).sum::<f64>() / d as f64 + eps).sqrt();
        x.iter()
            .zip(w)
            .map(|(a, g)| a / rms * g)
            .collect::<Vec<f64>>()
    };
    let mut want = vec![0.0; n * h * d];
    for hi in 0..h {
        let w = softmax_rows(
            n,
            |p, m| {
                (m <= p).then(|| {
                    scale
                        * dot(
                            &norm(row(q, &at, 0, p, hi, d), wq),
                            &norm(row(k, &at, 0, m, hi, d), wk),
                        )
                })
            },
            None,
        );
        apply(&mut want, &w, v, (0, hi, hi), n, h, h, d);
    }
    assert_close(&r.values["O"], &want, "qk_norm");
}

#[test]
fn a_sink_logit_joins_only_the_normalization() {
    let (n, h, d) = (8, 2, 3);
    let c = compile(
        "sink_attention",
        &[("N", n as u64), ("H", h as u64), ("D", d as u64)],
    );
    // Sinks both below and far above every score.
    let r = Run::new(&c, 8, &[("sink", vec![-0.5, 9.0])]);
    let (q, k, v) = (r.get("Q"), r.get("K"), r.get("V"));
    let (scale, sink) = (r.scalar("scale"), r.get("sink"));
    let at = bnhd(n, h, d);
    let mut want = vec![0.0; n * h * d];
    for hi in 0..h {
        let w = softmax_rows(
            n,
            |p, m| {
                (m <= p).then(|| scale * dot(&row(q, &at, 0, p, hi, d), &row(k, &at, 0, m, hi, d)))
            },
            Some(sink[hi]),
        );
        apply(&mut want, &w, v, (0, hi, hi), n, h, h, d);
    }
    assert_close(&r.values["O"], &want, "sink_attention");
}

#[test]
fn gla_decays_its_state_per_key_dimension() {
    let (t, h, dk, dv) = (7, 2, 3, 2);
    let c = compile(
        "gla",
        &[
            ("T", t as u64),
            ("H", h as u64),
            ("DK", dk as u64),
            ("DV", dv as u64),
        ],
    );
    let r = Run::new(&c, 9, &[]);
    let (q, k, v, gx) = (r.get("q"), r.get("k"), r.get("v"), r.get("gx"));
    let (ak, av) = (bnhd(t, h, dk), bnhd(t, h, dv));
    let mut want = vec![0.0; t * h * dv];
    for hi in 0..h {
        let mut s = vec![vec![0.0; dv]; dk];
        for ti in 0..t {
            for di in 0..dk {
                let gate = (1.0 / (1.0 + (-gx[ak(0, ti, hi, di)]).exp())).powf(1.0 / 16.0);
                for ei in 0..dv {
                    s[di][ei] = gate * s[di][ei] + k[ak(0, ti, hi, di)] * v[av(0, ti, hi, ei)];
                }
            }
            for ei in 0..dv {
                want[av(0, ti, hi, ei)] = (0..dk).map(|di| q[ak(0, ti, hi, di)] * s[di][ei]).sum();
            }
        }
    }
    assert_close(&r.values["O"], &want, "gla");
}

/// Gated DeltaNet, one token at a time, on [b, t, h, d] inputs: returns O.
#[allow(clippy::too_many_arguments)]
fn delta_rule(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    alpha: &dyn Fn(usize, usize) -> f64,
    beta: &dyn Fn(usize, usize) -> f64,
    (t, h, dk, dv): (usize, usize, usize, usize),
) -> Vec<f64> {
    let (ak, av) = (bnhd(t, h, dk), bnhd(t, h, dv));
    let mut out = vec![0.0; t * h * dv];
    for hi in 0..h {
        let mut s = vec![vec![0.0; dv]; dk];
        for ti in 0..t {
            let raw = row(k, &ak, 0, ti, hi, dk);
            let len = (dot(&raw, &raw) + 1e-6).sqrt();
            let kn: Vec<f64> = raw.iter().map(|x| x / len).collect();
            let (a, b) = (alpha(ti, hi), beta(ti, hi));
            // k^T S, then S <- a (S - b k (k^T S)) + b k v^T.
            let ks: Vec<f64> = (0..dv)
                .map(|e| (0..dk).map(|d| kn[d] * s[d][e]).sum())
                .collect();
            for d in 0..dk {
                for e in 0..dv {
                    s[d][e] = a * (s[d][e] - b * kn[d] * ks[e]) + b * kn[d] * v[av(0, ti, hi, e)];
                }
            }
            for e in 0..dv {
                out[av(0, ti, hi, e)] = (0..dk).map(|d| q[ak(0, ti, hi, d)] * s[d][e]).sum();
            }
        }
    }
    out
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn the_delta_rule_advances_its_state_with_k_transpose_s() {
    let (t, h, dk, dv) = (9, 2, 3, 2);
    let c = compile(
        "delta_rule",
        &[
            ("T", t as u64),
            ("H", h as u64),
            ("DK", dk as u64),
            ("DV", dv as u64),
        ],
    );
    // KS and S form one step body.
    let bodies = einattn_ir::validate::step_bodies(&c);
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0].einsums.len(), 2);
    let r = Run::new(&c, 10, &[]);
    let (ax, bx) = (r.get("ax").to_vec(), r.get("bx").to_vec());
    let want = delta_rule(
        r.get("q"),
        r.get("k"),
        r.get("v"),
        &|ti, hi| sigmoid(ax[ti * h + hi]),
        &|ti, hi| sigmoid(bx[ti * h + hi]),
        (t, h, dk, dv),
    );
    assert_close(&r.values["O"], &want, "delta_rule");
}

#[test]
fn chunked_deltanet_equals_the_token_by_token_delta_rule() {
    for (n, chunk) in [(12usize, 4u64), (12, 3), (8, 8), (6, 1)] {
        let (h, dk, dv) = (2, 3, 2);
        let c = compile(
            "delta_rule_chunked",
            &[
                ("N", n as u64),
                ("CHUNK", chunk),
                ("H", h as u64),
                ("DK", dk as u64),
                ("DV", dv as u64),
            ],
        );
        let r = Run::new(&c, 11, &[]);
        let bx = r.get("bx").to_vec();
        let want = delta_rule(
            r.get("q"),
            r.get("k"),
            r.get("v"),
            &|_, _| 1.0,
            &|ti, hi| sigmoid(bx[ti * h + hi]),
            (n, h, dk, dv),
        );
        assert_close(
            &r.values["O"],
            &want,
            &format!("delta_rule_chunked N={n} CHUNK={chunk}"),
        );
        // And the recurrent example with its decay at 1 (sigmoid(1000) = 1).
        let recurrent = compile(
            "delta_rule",
            &[
                ("T", n as u64),
                ("H", h as u64),
                ("DK", dk as u64),
                ("DV", dv as u64),
            ],
        );
        let same = |name: &'static str| (name, r.get(name).to_vec());
        let rr = Run::new(
            &recurrent,
            11,
            &[
                same("q"),
                same("k"),
                same("v"),
                same("bx"),
                ("ax", vec![1000.0; n * h]),
            ],
        );
        assert_close(&rr.values["O"], r.get("O"), "delta_rule at alpha = 1");
    }
}

#[test]
fn rmsnorm_then_gemm() {
    let (t, d, o) = (5, 4, 3);
    let c = compile(
        "rmsnorm_gemm",
        &[("T", t as u64), ("D", d as u64), ("DOUT", o as u64)],
    );
    let r = Run::new(&c, 12, &[]);
    let (x, w, wm) = (r.get("X"), r.get("w"), r.get("W"));
    let eps = r.scalar("eps");
    let mut want = vec![0.0; t * o];
    for ti in 0..t {
        let xr = &x[ti * d..(ti + 1) * d];
        let rms = (dot(xr, xr) / d as f64 + eps).sqrt();
        for oi in 0..o {
            want[ti * o + oi] = (0..d)
                .map(|di| xr[di] / rms * w[di] * wm[oi * d + di])
                .sum();
        }
    }
    assert_close(&r.values["Y"], &want, "rmsnorm_gemm");
}
