//! Attention weights that combine attention maps (differential attention): V distributed
//! over the combination, on the CPU. The rewrite must compute what the cascade computes
//! (the reference interpreter on both), each term must read as attention, and the compiled
//! kernels' formula must be the cascade's output.

use einattn_backends::family::softmax::combination::{compile_combination, distribute};
use einattn_backends::family::softmax::recognize;
use einattn_backends::family::subcascade::inputs_by_name;
use einattn_backends::family::{Compiled, Inputs, KernelOptions, KernelProgram};
use einattn_backends::reference::relative_error;
use einattn_ir::interp::{evaluate_in_order, random_inputs};
use einattn_ir::validate::topological_order;
use einattn_ir::Cascade;
use proptest::prelude::*;

fn build(name: &str, src: &str, defines: &[(&str, u64)]) -> Cascade {
    let defines: Vec<(String, u64)> = defines.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    einattn_dsl::compile_source(name, src, &defines)
        .unwrap_or_else(|d| panic!("{}\n{src}", d.render(name, src)))
}

fn example(name: &str, defines: &[(&str, u64)]) -> Cascade {
    let path = format!("{}/../examples/{name}.ein", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).expect("example exists");
    build(&path, &src, defines)
}

/// The output `O` of `c` by the reference interpreter.
fn output(c: &Cascade, inputs: &Inputs) -> Vec<f64> {
    let values = evaluate_in_order(c, inputs, &topological_order(c)).expect("interpreter runs");
    let o = c.tensor_by_name("O").expect("an output O");
    values.get(o).expect("computed").stored().into_owned()
}

/// How a term writes its coefficient `c` around the softmax weights `E / L`.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Before,
    After,
    Inside,
    Nested,
}

/// One term of a generated combination.
#[derive(Debug, Clone)]
struct Term {
    negative: bool,
    /// 0: none, 1: a literal, 2: a per-head parameter, 3: a per-head temporary.
    coefficient: u8,
    layout: Layout,
}

/// A cascade whose output weighs V by a linear combination of `terms.len()` causal (or
/// unmasked) softmax maps, each over its own Q and K; the combination inline in the
/// contraction or a tensor of its own, V on either side.
fn combination_source(terms: &[Term], causal: bool, inline: bool, v_first: bool) -> String {
    let mut s = String::from(
        "kernel combo\nsize B = 2\nsize H = 2\nsize N = 13\nsize D = 8\nsize DV = 4\n\
         rank b: B\nrank h: H\nrank e: D\nrank f: DV\nrank m: N\nrank p: N\n\
         input V[b, m, h, f]: bf16\nparam scale: f32 = 0.3\noutput O[b, p, h, f]: bf16\n",
    );
    let mask = if causal { " where m <= p" } else { "" };
    let mut combination = String::new();
    for (k, t) in terms.iter().enumerate() {
        let k = k + 1;
        s.push_str(&format!(
            "input Q{k}[b, p, h, e]: bf16\ninput K{k}[b, m, h, e]: bf16\n\
             param lam{k}[h]: f32\nparam lq{k}[h]: f32\nparam lk{k}[h]: f32\n\
             S{k}[b, h, m, p] = scale * Q{k}[b, p, h, e] * K{k}[b, m, h, e]{mask}\n\
             G{k}[b, h, p] = max[m] S{k}[b, h, m, p]\n\
             E{k}[b, h, m, p] = exp(S{k}[b, h, m, p] - G{k}[b, h, p])\n\
             L{k}[b, h, p] = E{k}[b, h, m, p]\n\
             LAM{k}[h] = exp(lq{k}[h] * lk{k}[h])\n"
        ));
        let e = format!("E{k}[b, h, m, p]");
        let l = format!("L{k}[b, h, p]");
        let c = match t.coefficient {
            1 => Some("0.75".to_string()),
            2 => Some(format!("lam{k}[h]")),
            3 => Some(format!("LAM{k}[h]")),
            _ => None,
        };
        let text = match (c, t.layout) {
            (None, _) => format!("{e} / {l}"),
            (Some(c), Layout::Before) => format!("{c} * {e} / {l}"),
            (Some(c), Layout::After) => format!("{e} / {l} * {c}"),
            (Some(c), Layout::Inside) => format!("{e} * {c} / {l}"),
            (Some(c), Layout::Nested) => format!("{e} / ({l} / {c})"),
        };
        let sign = match (k, t.negative) {
            (1, false) => "",
            (1, true) => "-",
            (_, false) => " + ",
            (_, true) => " - ",
        };
        combination.push_str(&format!("{sign}{text}"));
    }
    let weights = if inline {
        format!("({combination})")
    } else {
        s.push_str(&format!("A[b, h, m, p] = {combination}\n"));
        "A[b, h, m, p]".to_string()
    };
    let v = "V[b, m, h, f]";
    if v_first {
        s.push_str(&format!("O[b, p, h, f] = {v} * {weights}\n"));
    } else {
        s.push_str(&format!("O[b, p, h, f] = {weights} * {v}\n"));
    }
    s
}

fn term() -> impl Strategy<Value = Term> {
    (
        any::<bool>(),
        0u8..4,
        prop_oneof![
            Just(Layout::Before),
            Just(Layout::After),
            Just(Layout::Inside),
            Just(Layout::Nested)
        ],
    )
        .prop_map(|(negative, coefficient, layout)| Term {
            negative,
            coefficient,
            layout,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any signed combination of softmax maps with coefficients free of the key (literals,
    /// per-head parameters, per-head tensors the cascade computes), however the factors
    /// are arranged: the distributed cascade computes the cascade's output, and each of its
    /// terms reads as attention.
    #[test]
    fn distributing_v_over_a_combination_keeps_the_output(
        terms in proptest::collection::vec(term(), 2..=3),
        causal in any::<bool>(),
        inline in any::<bool>(),
        v_first in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let src = combination_source(&terms, causal, inline, v_first);
        let c = build("combo.ein", &src, &[]);
        let d = distribute(&c).unwrap_or_else(|| panic!("not distributed:\n{src}"));
        prop_assert_eq!(d.terms.len(), terms.len());
        let inputs = random_inputs(&c, seed);
        let want = output(&c, &inputs);
        let got = output(&d.cascade, &inputs_by_name(&c, &d.cascade, &inputs));
        let err = relative_error(&got, &want);
        prop_assert!(err < 1e-12, "relative difference {err}\n{src}");
        let (cores, _) = d.split().expect("the terms split off");
        for core in &cores {
            prop_assert!(recognize(core).is_ok(), "{} is not attention\n{src}", core.name);
        }
    }
}

/// What is not a combination of attention maps stays whole: one term, a product of two
/// maps, and a coefficient that depends on the key.
#[test]
fn only_sums_of_key_dependent_terms_distribute() {
    let one = Term {
        negative: false,
        coefficient: 2,
        layout: Layout::Before,
    };
    let src = combination_source(std::slice::from_ref(&one), true, false, false);
    assert!(distribute(&build("one.ein", &src, &[])).is_none(), "{src}");
    let two = combination_source(&[one.clone(), one], true, false, false);
    let product = two.replace(
        "A[b, h, m, p] = lam1[h] * E1[b, h, m, p] / L1[b, h, p] + ",
        "A[b, h, m, p] = E1[b, h, m, p] / L1[b, h, p] * ",
    );
    assert_ne!(product, two);
    assert!(
        distribute(&build("product.ein", &product, &[])).is_none(),
        "{product}"
    );
    // A coefficient that varies with the key is a weight: then the term is not attention.
    let keyed = two.replace("lam1[h] * E1", "(m + 1) * E1");
    assert_ne!(keyed, two);
    let c = build("keyed.ein", &keyed, &[]);
    assert!(compile_combination(&c, &KernelOptions::default()).is_none());
}

/// Differential attention at the paper's head dims (64 per half, V 128): one attention
/// kernel per term (entries suffixed by term, outputs in scratch), then the combination as a
/// post-kernel; the formula through the terms and the epilogue is the cascade's output, and
/// every kernel assembles without spills on both targets.
#[test]
fn differential_attention_compiles_to_a_kernel_per_term() {
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::Target;
    let c = example("differential_attention", &[("N", 70)]);
    let ptxas = ptxas_for_test("differential_attention_compiles_to_a_kernel_per_term");
    for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
        let options = KernelOptions {
            target,
            ..KernelOptions::default()
        };
        let k = compile_combination(&c, &options)
            .expect("distributes")
            .unwrap_or_else(|e| panic!("{}", e.message()));
        let entries: Vec<&str> = k.modules().iter().map(|m| m.ptx.entry.as_str()).collect();
        assert_eq!(entries.len(), 3, "{entries:?}");
        assert!(
            entries[0].ends_with("_t1") && entries[1].ends_with("_t2"),
            "{entries:?}"
        );
        assert!(matches!(k.modules()[2].program, KernelProgram::Points(_)));
        for (i, name) in ["O_t1", "O_t2"].iter().enumerate() {
            let writer = &k.modules()[i].contract;
            let post = &k.modules()[2].contract;
            for contract in [writer, post] {
                assert!(contract.scratch.iter().any(|s| &s.name == name), "{name}");
                assert!(!contract.tensors.iter().any(|t| &t.name == name), "{name}");
            }
        }
        for m in k.modules() {
            assert_eq!(m.contract.kernel, m.ptx.entry);
            assert!(m.ptx.text.contains(&format!(".entry {}(", m.ptx.entry)));
            if let (Some(ptxas), KernelProgram::Tile(_)) = (&ptxas, &m.program) {
                let r = assemble(ptxas, &m.ptx.text, arch).expect("ptxas assembles");
                assert!(!r.spills(), "{} {arch} spills:\n{}", m.ptx.entry, r.log);
            }
        }
        let inputs = random_inputs(&c, 3);
        let (formula, _) = k.formula(&inputs);
        let err = relative_error(&formula, &output(&c, &inputs));
        assert!(err < 1e-9, "{target:?}: formula: relative difference {err}");
        let explain = k.explain();
        assert!(explain.contains("O[b, p, h, f] = O_t1[b, p, h, f] - lam[h] * O_t2[b, p, h, f]"));
    }
}

/// Terms that mask different keys do not distribute (the cascade's sum skips a key any
/// term masks): the reason says so, and the general lowering takes the cascade.
#[test]
fn terms_with_different_masks_are_refused() {
    let path = format!(
        "{}/../examples/differential_attention.ein",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(&path).expect("example exists");
    let windowed = src.replace(
        "K2[b, m, h, e] where m <= p",
        "K2[b, m, h, e] where m <= p and p - m < 16",
    );
    assert_ne!(windowed, src);
    let c = build("windowed.ein", &windowed, &[("N", 70)]);
    let refusal = match compile_combination(&c, &KernelOptions::default()) {
        Some(Err(e)) => e.message(),
        Some(Ok(_)) => panic!("distributed over terms with different masks"),
        None => panic!("not read as a combination of attention terms"),
    };
    assert!(refusal.contains("different keys"), "{refusal}");
}
