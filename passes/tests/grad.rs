//! `einattn grad`: the backward cascade's gradients (interpreted in f64) against central
//! finite differences of the forward, for every example at small sizes and several seeds;
//! the examples the rules refuse are listed with the reason and must be refused with a
//! located diagnostic.

use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::{validate, Cascade, Handle, Tensor, TensorKind};
use einattn_passes::grad::{backward_inputs, grad, Grad, GradOptions};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Small sizes for every size symbol the examples use (unused ones are only warnings).
const SIZES: &[(&str, u64)] = &[
    ("B", 1),
    ("H", 2),
    ("N", 8),
    ("M", 8),
    ("D", 2),
    ("TILE", 4),
    ("BLOCK", 4),
    ("CHUNK", 4),
    ("GROUP", 2),
    ("W", 3),
    ("T", 4),
    ("DK", 2),
    ("DV", 2),
    ("DOUT", 3),
    ("VOCAB", 5),
];

/// Examples the rules refuse, with the reason; each must be refused with a located error.
/// Every example is differentiated now (the linear-attention recurrences and the delta
/// rule's step bodies by reverse recurrences); the list stays for the next refusal.
const REFUSED: &[(&str, &str)] = &[];

fn examples() -> Vec<(String, String)> {
    let mut out = ein_files(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    // The grad file tests' inputs (every map operator, a masked max, ...), except refusals.
    out.extend(
        ein_files(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/filetests/grad"
        ))
        .into_iter()
        .filter(|(n, _)| !n.starts_with("refused")),
    );
    out
}

fn ein_files(dir: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("examples/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ein"))
        .map(|p| {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            (name, std::fs::read_to_string(&p).expect("read example"))
        })
        .collect();
    out.sort();
    out
}

fn compile(name: &str, text: &str) -> Cascade {
    compile_with(name, text, SIZES)
}

fn compile_with(name: &str, text: &str, sizes: &[(&str, u64)]) -> Cascade {
    let defines: Vec<(String, u64)> = sizes.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    einattn_dsl::compile_source_with_warnings(name, text, &defines)
        .map(|(c, _)| c)
        .unwrap_or_else(|d| panic!("{name}: {}", d.render(name, text)))
}

fn forward(
    c: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
) -> einattn_ir::interp::Values {
    evaluate_in_order(c, inputs, &validate::topological_order(c)).expect("forward evaluates")
}

/// L = sum over outputs of sum(W * O).
fn objective(
    c: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
    w: &HashMap<Handle<Tensor>, TensorData>,
) -> f64 {
    let values = forward(c, inputs);
    let mut l = 0.0;
    for (o, wd) in w {
        let v = values.get(*o).expect("output").stored();
        l += v.iter().zip(&wd.values).map(|(a, b)| a * b).sum::<f64>();
    }
    l
}

fn check_example(name: &str, text: &str, seed: u64, wrt_params: bool) {
    check_cascade(name, &compile(name, text), seed, wrt_params);
}

fn check_cascade(name: &str, c: &Cascade, seed: u64, wrt_params: bool) {
    let c = c.clone();
    let wrt = wrt_params.then(|| c.inputs().map(|h| c.tensors[h].name.clone()).collect());
    let g: Grad =
        grad(&c, &GradOptions { wrt }).unwrap_or_else(|d| panic!("{name}: refused: {d:?}"));
    // The printed backward compiles back.
    let printed = einattn_ir::print::print(&g.cascade);
    einattn_dsl::compile_source_with_warnings("backward.ein", &printed, &[]).unwrap_or_else(|d| {
        panic!(
            "{name}: backward does not compile:\n{}\n{printed}",
            d.render("backward.ein", &printed)
        )
    });
    let inputs = random_inputs(&c, seed);
    let values = forward(&c, &inputs);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut w = HashMap::new();
    for o in c.outputs() {
        let shape = einattn_ir::interp::shape_of(&c, o);
        let n = shape.iter().product();
        w.insert(
            o,
            TensorData::new(shape, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()),
        );
    }
    let b_inputs = backward_inputs(&c, &g, &values, &w).expect("backward inputs");
    let b_values = evaluate_in_order(
        &g.cascade,
        &b_inputs,
        &validate::topological_order(&g.cascade),
    )
    .expect("backward evaluates");
    assert!(!g.grads.is_empty(), "{name}: no gradients");
    for &(d, x) in &g.grads {
        let ad = b_values.get(d).expect("gradient").stored().to_vec();
        let base = inputs.get(&x).cloned().unwrap_or_else(|| {
            TensorData::filled(
                einattn_ir::interp::shape_of(&c, x),
                c.tensors[x].default.unwrap_or(0.0),
            )
        });
        let h = 1e-5;
        let mut fd = vec![0.0; base.values.len()];
        for (i, slot) in fd.iter_mut().enumerate() {
            let mut plus = inputs.clone();
            let mut minus = inputs.clone();
            let mut p = base.clone();
            p.values[i] += h;
            plus.insert(x, p);
            let mut m = base.clone();
            m.values[i] -= h;
            minus.insert(x, m);
            *slot = (objective(&c, &plus, &w) - objective(&c, &minus, &w)) / (2.0 * h);
        }
        let num: f64 = ad
            .iter()
            .zip(&fd)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let den: f64 = fd.iter().map(|b| b * b).sum::<f64>().sqrt();
        // Relative to the gradient's norm, floored at 1e-3: a gradient near 0 (`cap` of a
        // soft-cap at 30 barely moves the scores) is below what differences resolve.
        let rel = num / den.max(1e-3);
        assert!(
            rel < 1e-6,
            "{name} seed {seed}: d{} relative error {rel:e}\nAD {ad:?}\nFD {fd:?}\n{printed}",
            c.tensors[x].name
        );
    }
}

#[test]
fn refused_examples_are_refused_with_a_location() {
    for (name, text) in examples() {
        let Some((_, reason)) = REFUSED.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let c = compile(&name, &text);
        let Err(d) = grad(&c, &GradOptions::default()) else {
            panic!("{name} is listed as refused ({reason}) but was differentiated: take it off the list");
        };
        let rendered = einattn_dsl::Diagnostics::new(d).render(&name, &text);
        assert!(
            rendered.contains(&format!("{name}:")),
            "{name}: not located:\n{rendered}"
        );
        assert!(rendered.contains("cannot differentiate"), "{rendered}");
    }
}

#[test]
fn the_refused_list_names_examples() {
    let names: Vec<String> = examples().into_iter().map(|(n, _)| n).collect();
    for (n, _) in REFUSED {
        assert!(names.iter().any(|x| x == n), "{n} is not an example");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]
    #[test]
    fn gradients_match_finite_differences(seed in 0u64..1_000_000) {
        for (name, text) in examples() {
            if REFUSED.iter().any(|(n, _)| *n == name) {
                continue;
            }
            check_example(&name, &text, seed, false);
        }
    }
}

/// The linear-attention recurrences and the delta rule, whose adjoints are reverse
/// recurrences (step bodies for the delta rule), at drawn shapes: sequence lengths, block
/// and chunk sizes, head and feature dimensions; every input and parameter differentiated.
const RECURRENCES: &[&str] = &[
    "lightning",
    "gla",
    "gated_linear",
    "delta_rule",
    "delta_rule_chunked",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn recurrence_gradients_match_finite_differences_over_shapes(
        seed in 0u64..1_000_000,
        heads in 1u64..=2,
        blocks in 1u64..=3,
        block in 1u64..=4,
        // At least two key features: the delta rule normalizes keys, and a one-element
        // key normalizes to its sign, whose smoothed step near 0 central differences with
        // h = 1e-5 cannot resolve (the gradient is exact there; the difference is not).
        dk in 2u64..=3,
        dv in 1u64..=3,
    ) {
        let n = blocks * block;
        let sizes: Vec<(&str, u64)> = vec![
            ("B", 1), ("H", heads), ("N", n), ("BLOCK", block), ("CHUNK", block),
            ("D", dk), ("T", n), ("DK", dk), ("DV", dv),
        ];
        for (name, text) in examples() {
            if !RECURRENCES.contains(&name.as_str()) {
                continue;
            }
            let c = compile_with(&name, &text, &sizes);
            check_cascade(&format!("{name} {sizes:?}"), &c, seed, true);
        }
    }
}

/// The backward of Lightning attention: the forward state `KV` is recomputed, its adjoint
/// `dKV` is a reverse recurrence over the blocks (`init dKV[.., T, ..]`) whose step
/// carries `dKV_next[t] = dKV[t + 1]` and scales it by the block decay, and the analysis
/// counts two traversals of the blocks: up for `KV`, down for `dKV`.
#[test]
fn lightning_backward_runs_its_state_down_the_blocks() {
    use einattn_passes::analysis::{analyze, AnalysisOptions};
    let (name, text) = examples()
        .into_iter()
        .find(|(n, _)| n == "lightning")
        .expect("lightning");
    let c = compile(&name, &text);
    let g = grad(&c, &GradOptions::default()).expect("differentiates");
    assert!(g.saved.is_empty(), "{:?}", g.saved);
    assert!(
        g.recomputed.contains(&"KV".to_string()),
        "{:?}",
        g.recomputed
    );
    let b = &g.cascade;
    let dkv = b.tensor_by_name("dKV").expect("dKV");
    let (_, e) = b
        .einsums
        .iter()
        .find(|(_, e)| e.output.tensor == dkv)
        .expect("dKV is assigned");
    let rec = e.recurrence.as_ref().expect("dKV is a recurrence");
    assert!(rec.reverse);
    assert_eq!(b.ranks[rec.rank].name, "t");
    let printed = einattn_ir::print::print(b);
    for line in [
        "dKV_next[b, h, t, d, e] = dKV[b, h, t + 1, d, e]",
        "init dKV[b, h, T, d, e] = 0",
        "dK_S[b, n, h, d] = dS[b, h, t, j, i] * Q[b, 4*t + j, h, d] where i <= j",
    ] {
        assert!(printed.contains(line), "missing `{line}`:\n{printed}");
    }
    let back = einattn_dsl::compile_source("backward.ein", &printed, &[]).expect("re-parses");
    let report = analyze(&back, &AnalysisOptions::default());
    assert_eq!(report.passes.get("n"), Some(&2), "{:?}", report.passes);
    let pass_of = |einsum: &str| {
        report
            .einsums
            .iter()
            .find(|e| e.einsum == einsum)
            .and_then(|e| e.passes.get("n").copied())
    };
    assert_eq!(pass_of("KV"), Some(1));
    assert_eq!(pass_of("dKV"), Some(2));
    assert_eq!(pass_of("dKV_next"), Some(2));
}

/// What grad still refuses, at the read: a state read at a step other than `t`, `t + 1`
/// or the last, and a cascade that already has a reverse recurrence.
#[test]
fn unsupported_recurrence_reads_are_refused_at_the_read() {
    let behind = "\
kernel behind
size T = 4
rank t: T
input X[t]: f32
output O[t]: f32
S[t + 1] = S[t] + X[t]
init S[0] = 0
O[t] = S[T - 1 - t]
";
    let c = compile("behind", behind);
    let d = grad(&c, &GradOptions::default()).expect_err("refused");
    let rendered = einattn_dsl::Diagnostics::new(d).render("behind", behind);
    assert!(
        rendered.contains("cannot differentiate through this read of the state `S`"),
        "{rendered}"
    );
    assert!(rendered.contains("behind:8:8"), "{rendered}");

    let reverse = "\
kernel reverse
size T = 4
rank t: T
input X[t]: f32
output O[t]: f32
R[t] = R[t + 1] + X[t]
init R[T] = 0
O[t] = R[t]
";
    let c = compile("reverse", reverse);
    let d = grad(&c, &GradOptions::default()).expect_err("refused");
    let rendered = einattn_dsl::Diagnostics::new(d).render("reverse", reverse);
    assert!(
        rendered.contains("cannot differentiate a reverse recurrence"),
        "{rendered}"
    );
    assert!(rendered.contains("reverse:6:1"), "{rendered}");
}

#[test]
fn gradients_of_parameters_match_finite_differences() {
    for (name, text) in examples() {
        if REFUSED.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let c = compile(&name, &text);
        if !c.tensors.iter().any(|(_, t)| t.kind == TensorKind::Param) {
            continue;
        }
        match grad(
            &c,
            &GradOptions {
                wrt: Some(c.inputs().map(|h| c.tensors[h].name.clone()).collect()),
            },
        ) {
            Ok(_) => check_example(&name, &text, 7, true),
            Err(d) => {
                let rendered = einattn_dsl::Diagnostics::new(d).render(&name, &text);
                assert!(
                    rendered.contains("cannot differentiate"),
                    "{name}: {rendered}"
                );
            }
        }
    }
}

type Inputs = HashMap<Handle<Tensor>, TensorData>;

/// Evaluates the backward of `c` on seeded inputs: (gradient name, stored values).
fn backward_values(c: &Cascade, g: &Grad, seed: u64) -> (Vec<(String, Vec<f64>)>, Inputs) {
    let inputs = random_inputs(c, seed);
    let values = forward(c, &inputs);
    let mut w = HashMap::new();
    for o in c.outputs() {
        let shape = einattn_ir::interp::shape_of(c, o);
        let n: usize = shape.iter().product();
        w.insert(
            o,
            TensorData::new(
                shape,
                (0..n).map(|i| ((i * 7 % 11) as f64) / 11.0 - 0.5).collect(),
            ),
        );
    }
    let b_inputs = backward_inputs(c, g, &values, &w).expect("backward inputs");
    let b = evaluate_in_order(
        &g.cascade,
        &b_inputs,
        &validate::topological_order(&g.cascade),
    )
    .expect("backward evaluates");
    let grads = g
        .grads
        .iter()
        .map(|&(d, _)| {
            (
                g.cascade.tensors[d].name.clone(),
                b.get(d).expect("gradient").stored().to_vec(),
            )
        })
        .collect();
    (grads, b_inputs)
}

/// `optimize` of a backward cascade keeps its value: the interpreter before and after, by
/// tensor name, for every example the rules differentiate.
#[test]
fn optimize_keeps_the_backward_value() {
    use einattn_passes::rewrite::{optimize, OptimizeOptions};
    let mut optimized_some = 0;
    for (name, text) in examples() {
        if REFUSED.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let c = compile(&name, &text);
        let g = grad(&c, &GradOptions::default()).expect("differentiates");
        let Ok(opt) = optimize(&g.cascade, &OptimizeOptions::default()) else {
            continue;
        };
        if !opt.applied.is_empty() {
            optimized_some += 1;
        }
        let (before, b_inputs) = backward_values(&c, &g, 3);
        // The optimized cascade keeps every input by name.
        let by_name: HashMap<Handle<Tensor>, TensorData> = b_inputs
            .iter()
            .filter_map(|(h, d)| {
                opt.cascade
                    .tensor_by_name(&g.cascade.tensors[*h].name)
                    .map(|n| (n, d.clone()))
            })
            .collect();
        let after = evaluate_in_order(
            &opt.cascade,
            &by_name,
            &validate::topological_order(&opt.cascade),
        )
        .expect("optimized backward evaluates");
        for (grad_name, values) in before {
            let h = opt
                .cascade
                .tensor_by_name(&grad_name)
                .expect("gradient kept");
            let got = after.get(h).expect("value").stored().to_vec();
            let num: f64 = got
                .iter()
                .zip(&values)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
            let den: f64 = values.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-12);
            assert!(
                num / den < 1e-9,
                "{name}: optimize changed {grad_name}: {:e}",
                num / den
            );
        }
    }
    eprintln!("optimize applied rewrites to {optimized_some} backward cascades");
}

/// The backward of FlashAttention-2's forward (attention_1pass) is FlashAttention-2's
/// backward: a row pre-pass `dRD[p] = sum_f dAV * -AV / RD` (D = rowsum(dO * O), scaled)
/// that does not touch the key rank, then one pass over the key rank m per query, with the
/// probabilities recomputed from the saved final max and denominator.
#[test]
fn attention_1pass_backward_is_flash_attention_2() {
    use einattn_passes::analysis::{analyze, AnalysisOptions};
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/attention_1pass.ein"
    ))
    .expect("example");
    let c = einattn_dsl::compile_source("attention_1pass.ein", &text, &[]).expect("compiles");
    let g = grad(&c, &GradOptions::default()).expect("differentiates");
    assert_eq!(g.stabilizers, vec!["RM".to_string()]);
    assert_eq!(g.saved, vec!["RM_final", "RD_final", "AV"]);
    assert_eq!(g.recomputed, vec!["BQK", "SLN"]);
    let printed = einattn_ir::print::print(&g.cascade);
    let b = einattn_dsl::compile_source("backward.ein", &printed, &[]).expect("re-parses");
    let report = analyze(&b, &AnalysisOptions::default());
    assert_eq!(report.passes.get("m"), Some(&1), "{:?}", report.passes);
    // The only recurrence-free reduction away from m: the row pre-pass over f.
    let pre = report
        .einsums
        .iter()
        .find(|e| e.einsum == "dRD")
        .expect("dRD");
    let reduced: Vec<&str> = pre.reductions.iter().map(|r| r.rank.as_str()).collect();
    assert_eq!(reduced, vec!["f"]);
    assert!(!pre.passes.contains_key("m"), "{:?}", pre.passes);
    assert!(
        pre.ranks.iter().all(|r| r == "p" || r == "f"),
        "{:?}",
        pre.ranks
    );
    // Every Einsum that iterates the key rank is in its single pass.
    for e in &report.einsums {
        if let Some(p) = e.passes.get("m") {
            assert_eq!(*p, 1, "{} is in pass {p} over m", e.einsum);
        }
    }
    // No recurrence is left: the running max and the rescaling folded away.
    assert!(b.einsums.iter().all(|(_, e)| e.recurrence.is_none()));
}
