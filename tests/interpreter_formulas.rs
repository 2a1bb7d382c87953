//! The reference interpreter against direct Rust evaluations of each example's formula,
//! and the examples that compute one function in several ways against each other.

use einattn::cli::SourceFile;
use einattn_ir::interp::{self, TensorData};
use einattn_ir::Cascade;
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;

fn compile(example: &str, defines: &[(&str, u64)]) -> Cascade {
    let defines: Vec<(String, u64)> = defines.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    let source = SourceFile::load(&Path::new("examples").join(example)).expect("example exists");
    match source.compile(&defines) {
        Ok(c) => c,
        Err(e) => panic!("{example} does not compile:\n{e}"),
    }
}

/// Inputs by name, drawn once per seed, and every tensor after evaluation.
struct Evaluated {
    inputs: HashMap<String, TensorData>,
    values: HashMap<String, TensorData>,
}

fn evaluate(cascade: &Cascade, seed: u64) -> Evaluated {
    let inputs = interp::random_inputs(cascade, seed);
    evaluate_with(cascade, inputs)
}

fn evaluate_with(
    cascade: &Cascade,
    inputs: HashMap<einattn_ir::Handle<einattn_ir::Tensor>, TensorData>,
) -> Evaluated {
    let order = einattn_ir::validate::topological_order(cascade);
    let values = interp::evaluate_in_order(cascade, &inputs, &order).expect("evaluates");
    let by_name = |m: HashMap<einattn_ir::Handle<einattn_ir::Tensor>, TensorData>| {
        m.into_iter()
            .map(|(h, d)| (cascade.tensors[h].name.clone(), d))
            .collect::<HashMap<_, _>>()
    };
    Evaluated {
        inputs: by_name(inputs),
        values: by_name(values.tensors),
    }
}

/// Evaluates `b` on the inputs `a` drew (matched by name), so two cascades of one function
/// see the same data.
fn evaluate_on_same_inputs(a: &Cascade, b: &Cascade, seed: u64) -> (Evaluated, Evaluated) {
    let ea = evaluate(a, seed);
    let inputs = b
        .inputs()
        .map(|h| {
            let name = &b.tensors[h].name;
            let data = ea.inputs.get(name).cloned().unwrap_or_else(|| {
                panic!("input `{name}` of the second cascade is missing from the first")
            });
            (h, data)
        })
        .collect();
    let eb = evaluate_with(b, inputs);
    (ea, eb)
}

fn assert_close(got: &TensorData, want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let got = got.stored();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "{what}: non-finite output {g}");
        num += (g - w) * (g - w);
        den += w * w;
    }
    let rel = (num / den.max(1e-300)).sqrt();
    assert!(rel < 1e-10, "{what}: relative error {rel:e}");
}

/// Softmax attention on row-major [.., n, h, d] data with an optional score mask and bias.
#[allow(clippy::too_many_arguments)]
fn softmax_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (b, n, h, d): (usize, usize, usize, usize),
    scale: f64,
    visible: impl Fn(usize, usize) -> bool,
    bias: impl Fn(usize, usize, usize) -> f64,
) -> Vec<f64> {
    let at = |bi: usize, ni: usize, hi: usize, di: usize| ((bi * n + ni) * h + hi) * d + di;
    let mut out = vec![0.0; b * n * h * d];
    for bi in 0..b {
        for hi in 0..h {
            for p in 0..n {
                let scores: Vec<Option<f64>> = (0..n)
                    .map(|m| {
                        visible(p, m).then(|| {
                            let dot: f64 = (0..d)
                                .map(|e| q[at(bi, p, hi, e)] * k[at(bi, m, hi, e)])
                                .sum();
                            scale * dot + bias(hi, p, m)
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                    .collect();
                let total: f64 = weights.iter().sum();
                for f in 0..d {
                    let acc: f64 = (0..n).map(|m| weights[m] * v[at(bi, m, hi, f)]).sum();
                    out[at(bi, p, hi, f)] = acc / total;
                }
            }
        }
    }
    out
}

fn values<'a>(e: &'a Evaluated, name: &str) -> &'a [f64] {
    &e.inputs
        .get(name)
        .or_else(|| e.values.get(name))
        .unwrap_or_else(|| panic!("no `{name}`"))
        .values
}

#[test]
fn three_two_and_one_pass_attention_agree_with_softmax() {
    let defines = [("M", 128), ("D", 16), ("TILE", 32)];
    let three = compile("attention_3pass.ein", &defines);
    let seed = 7;
    let e3 = evaluate(&three, seed);
    let want = softmax_attention(
        values(&e3, "Q"),
        values(&e3, "K"),
        values(&e3, "V"),
        (1, 128, 1, 16),
        0.125,
        |_, _| true,
        |_, _, _| 0.0,
    );
    assert_close(&e3.values["AV"], &want, "attention_3pass");
    for other in ["attention_2pass.ein", "attention_1pass.ein"] {
        let c = compile(other, &defines);
        let (_, e) = evaluate_on_same_inputs(&three, &c, seed);
        assert_close(&e.values["AV"], &want, other);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn one_pass_attention_equals_softmax(tiles in 1u64..5, tile in prop::sample::select(vec![4u64, 8, 16]), d in 1u64..9, seed in any::<u64>()) {
        let m = tiles * tile;
        let c = compile("attention_1pass.ein", &[("M", m), ("D", d), ("TILE", tile)]);
        let e = evaluate(&c, seed);
        let want = softmax_attention(values(&e, "Q"), values(&e, "K"), values(&e, "V"),
            (1, m as usize, 1, d as usize), 0.125, |_, _| true, |_, _, _| 0.0);
        assert_close(&e.values["AV"], &want, "attention_1pass");
    }

    #[test]
    fn causal_attention_equals_masked_softmax(b in 1u64..3, h in 1u64..3, tiles in 1u64..4, tile in prop::sample::select(vec![4u64, 8]), d in 1u64..6, seed in any::<u64>()) {
        let n = tiles * tile;
        let c = compile("attention_causal.ein", &[("B", b), ("H", h), ("N", n), ("D", d), ("TILE", tile)]);
        let e = evaluate(&c, seed);
        let want = softmax_attention(values(&e, "Q"), values(&e, "K"), values(&e, "V"),
            (b as usize, n as usize, h as usize, d as usize), 0.125, |p, m| m <= p, |_, _, _| 0.0);
        assert_close(&e.values["O"], &want, "attention_causal");
    }

    #[test]
    fn sliding_window_equals_masked_softmax_with_alibi(h in 1u64..3, tiles in 1u64..5, tile in prop::sample::select(vec![4u64, 8]), w in 1u64..12, d in 1u64..6, seed in any::<u64>()) {
        let n = tiles * tile;
        let c = compile("attention_sliding_window.ein", &[("B", 1), ("H", h), ("N", n), ("D", d), ("TILE", tile), ("W", w)]);
        let e = evaluate(&c, seed);
        let slope = values(&e, "slope").to_vec();
        let want = softmax_attention(values(&e, "Q"), values(&e, "K"), values(&e, "V"),
            (1, n as usize, h as usize, d as usize), 0.125,
            |p, m| m <= p && p - m < w as usize,
            |hi, p, m| -slope[hi] * (p as f64 - m as f64));
        assert_close(&e.values["O"], &want, "attention_sliding_window");
    }

    #[test]
    fn linear_attention_equals_q_times_kt_v(b in 1u64..3, h in 1u64..3, n in 1u64..20, d in 1u64..6, seed in any::<u64>()) {
        let c = compile("linear_attention.ein", &[("B", b), ("H", h), ("N", n), ("D", d)]);
        let e = evaluate(&c, seed);
        let (b, n, h, d) = (b as usize, n as usize, h as usize, d as usize);
        let (q, k, v) = (values(&e, "Q"), values(&e, "K"), values(&e, "V"));
        let at = |bi: usize, ni: usize, hi: usize, di: usize| ((bi * n + ni) * h + hi) * d + di;
        let mut want = vec![0.0; b * n * h * d];
        for bi in 0..b { for hi in 0..h { for p in 0..n { for f in 0..d {
            // Left product first, the quadratic way, to check the right-product-first cascade.
            want[at(bi, p, hi, f)] = (0..n).map(|m| {
                let s: f64 = (0..d).map(|x| q[at(bi, p, hi, x)] * k[at(bi, m, hi, x)]).sum();
                s * v[at(bi, m, hi, f)]
            }).sum();
        }}}}
        assert_close(&e.values["O"], &want, "linear_attention");
    }

    #[test]
    fn lightning_chunked_equals_naive_and_the_formula(h in 1u64..3, blocks in 1u64..5, block in prop::sample::select(vec![1u64, 2, 4, 8]), d in 1u64..6, seed in any::<u64>()) {
        let n = blocks * block;
        let defines = [("B", 1), ("H", h), ("N", n), ("D", d), ("BLOCK", block)];
        let naive = compile("lightning_naive.ein", &defines);
        let chunked = compile("lightning.ein", &defines);
        let (en, ec) = evaluate_on_same_inputs(&naive, &chunked, seed);
        let (n, h, d) = (n as usize, h as usize, d as usize);
        let (q, k, v, s) = (values(&en, "Q"), values(&en, "K"), values(&en, "V"), values(&en, "s"));
        let at = |ni: usize, hi: usize, di: usize| (ni * h + hi) * d + di;
        let mut want = vec![0.0; n * h * d];
        for hi in 0..h { for p in 0..n { for f in 0..d {
            want[at(p, hi, f)] = (0..=p).map(|m| {
                let dot: f64 = (0..d).map(|x| q[at(p, hi, x)] * k[at(m, hi, x)]).sum();
                (-s[hi] * (p - m) as f64).exp() * dot * v[at(m, hi, f)]
            }).sum();
        }}}
        assert_close(&en.values["O"], &want, "lightning_naive");
        assert_close(&ec.values["O"], &want, "lightning");
    }
}

/// The interpreter evaluates large Einsums on every core (ranges of their points): the
/// first NaN it reports is still the first in the serial, row-major order, whichever
/// worker met it, and the values are those of the point-by-point definition.
#[test]
fn points_evaluated_on_every_core_keep_the_serial_order_of_nan_origins() {
    let dir = std::env::temp_dir().join(format!("einattn_par_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("logs.ein");
    // 96 x 128 points: above the interpreter's threshold for splitting.
    std::fs::write(
        &path,
        "kernel logs\nsize I = 96\nsize J = 128\nrank i: I\nrank j: J\n\
         input A[i, j]: f32\noutput L[i, j]: f32\nL[i, j] = log(A[i, j])\n",
    )
    .expect("write source");
    let source = SourceFile::load(&path).expect("loads");
    let cascade = source.compile(&[]).expect("compiles");
    let a = cascade.tensor_by_name("A").expect("A");
    let mut values: Vec<f64> = (0..96 * 128).map(|k| 1.0 + k as f64).collect();
    // Negative entries in rows that different workers evaluate (whatever the core count);
    // the first in row-major order is (10, 50).
    for (i, j) in [(90, 1), (40, 127), (10, 50), (70, 5), (95, 127)] {
        values[i * 128 + j] = -1.0;
    }
    let mut inputs = HashMap::new();
    inputs.insert(a, TensorData::new(vec![96, 128], values.clone()));
    let order = einattn_ir::validate::topological_order(&cascade);
    let out = interp::evaluate_in_order(&cascade, &inputs, &order).expect("evaluates");
    let origin = &out.nan_origins[0];
    let point: Vec<i64> = origin.point.iter().map(|(_, i)| *i).collect();
    assert_eq!(point, vec![10, 50], "{}", origin.message(&cascade));
    let l = &out.tensors[&cascade.tensor_by_name("L").expect("L")];
    for (k, (&got, &x)) in l.values.iter().zip(&values).enumerate() {
        assert!(
            got.to_bits() == x.ln().to_bits(),
            "point {k}: {got} != ln({x})"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
