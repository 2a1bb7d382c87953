//! The general lowering against the reference interpreter, on the CPU: every example (at
//! small sizes) lowered to point kernels and run by the point-program interpreter gives
//! the cascade interpreter's outputs.

use einattn_backends::family::general::{interp, lower::lower, program::SlotKind};
use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::validate::topological_order;
use einattn_ir::Cascade;
use std::collections::HashMap;
use std::path::PathBuf;

fn load(name: &str, defines: &[(&str, u64)]) -> Cascade {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(format!("{name}.ein"));
    let src = std::fs::read_to_string(&path).expect("example");
    let defines: Vec<(String, u64)> = defines.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    einattn_dsl::compile_source(&path.display().to_string(), &src, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render(name, &src)))
}

/// The names of the bundled `.ein` examples (examples/ also holds the Rust app's crate).
fn example_names() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("examples")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ein"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

/// The largest relative difference between the point program's outputs and the cascade
/// interpreter's, over every output.
pub fn difference(c: &Cascade, seed: u64) -> f64 {
    let inputs = random_inputs(c, seed);
    let want = evaluate_in_order(c, &inputs, &topological_order(c)).expect("interpreter");
    let program = lower(c, None, "k");
    let by_name: HashMap<String, TensorData> = inputs
        .iter()
        .map(|(h, d)| (c.tensors[*h].name.clone(), d.clone()))
        .collect();
    let mut by_name = by_name;
    for (h, t) in c.tensors.iter() {
        if let (einattn_ir::TensorKind::Param, Some(v)) = (t.kind, t.default) {
            by_name
                .entry(t.name.clone())
                .or_insert_with(|| TensorData::filled(einattn_ir::interp::shape_of(c, h), v));
        }
    }
    let memory = interp::Memory::new(&program, &by_name).expect("memory");
    let got = interp::run(&program, memory).expect("runs");
    let mut worst: f64 = 0.0;
    for (s, slot) in program.slots.iter().enumerate() {
        if slot.kind != SlotKind::Output {
            continue;
        }
        let t = c
            .tensor_by_name(&slot.name)
            .expect("an output of the cascade");
        let reference = want.get(t).expect("computed").stored();
        let mine = got.stored(s);
        let err = einattn_backends::reference::relative_error(&mine, &reference);
        worst = worst.max(if err.is_nan() { f64::INFINITY } else { err });
    }
    worst
}

#[test]
fn every_example_lowers_to_point_kernels_that_match_the_interpreter() {
    let small: &[(&str, &[(&str, u64)])] = &[
        ("attention_1pass", &[("M", 128), ("D", 16), ("TILE", 32)]),
        ("attention_2pass", &[("M", 64), ("D", 16)]),
        ("attention_3pass", &[("M", 64), ("D", 16)]),
        ("attention_causal", &[("N", 128), ("D", 16), ("TILE", 32)]),
        (
            "attention_mla",
            &[("N", 64), ("D", 48), ("DV", 16), ("TILE", 32)],
        ),
        ("attention_mha", &[("N", 128), ("D", 16), ("TILE", 32)]),
        (
            "attention_sliding_window",
            &[("N", 128), ("D", 16), ("TILE", 32), ("W", 40)],
        ),
        ("attention_softcap", &[("N", 128), ("D", 16)]),
        ("flash_decoding", &[("N", 128), ("D", 16)]),
        (
            "gqa_decoding",
            &[("N", 64), ("D", 16), ("H", 4), ("GROUP", 2)],
        ),
        (
            "gqa_sink_decoding",
            &[("N", 64), ("D", 16), ("H", 4), ("GROUP", 2)],
        ),
        (
            "cross_attention",
            &[("N", 40), ("M", 77), ("D", 16), ("TILE", 7)],
        ),
        ("gated_attention", &[("N", 64), ("D", 16), ("TILE", 16)]),
        ("gated_linear", &[("N", 64), ("D", 16), ("BLOCK", 8)]),
        ("lightning", &[("N", 64), ("D", 16), ("BLOCK", 8)]),
        ("lightning_naive", &[("N", 64), ("D", 16)]),
        ("linear_attention", &[("N", 64), ("D", 16)]),
        ("linear_causal", &[("N", 64), ("D", 16)]),
        ("lm_head_entropy", &[("T", 16), ("D", 16), ("VOCAB", 64)]),
    ];
    let names = example_names();
    for name in names {
        let sizes = small
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&[][..], |(_, s)| s);
        let c = load(&name, sizes);
        let err = difference(&c, 5);
        assert!(err < 1e-12, "{name}: relative difference {err}");
    }
}

/// Every point kernel of every example assembles for sm_80 and sm_90a without spills.
#[test]
fn every_point_kernel_assembles() {
    use einattn_backends::family::general::ptx::print;
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::Target;
    let Some(ptxas) = ptxas_for_test("every_point_kernel_assembles") else {
        return;
    };
    let names = example_names();
    for name in names {
        let c = load(&name, &[]);
        let program = lower(&c, None, "k");
        for k in &program.kernels {
            for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
                let ptx = print(&program, k, target);
                let r = assemble(&ptxas, &ptx.text, arch)
                    .unwrap_or_else(|e| panic!("{name} {} {arch}: {e}\n{}", ptx.entry, ptx.text));
                assert!(!r.spills(), "{name} {}: {r:?}", ptx.entry);
            }
        }
    }
}

/// The generator's random cascades (CI runs 300; the device script checks 200 more on a
/// GPU): each validates, compiles through the kernel families, and its point program
/// matches the cascade interpreter.
#[test]
fn random_cascades_lower_to_point_kernels_that_match_the_interpreter() {
    use einattn_backends::family::general::random::random_cascade;
    use einattn_backends::family::{self, CompileError, KernelOptions, Request};
    for seed in 0..300 {
        let text = random_cascade(seed);
        let name = format!("random_{seed}.ein");
        let build = |d: &[(String, u64)]| {
            einattn_dsl::compile_source(&name, &text, d)
                .map_err(|e| CompileError::Source(e.items().to_vec()))
        };
        let c = build(&[]).unwrap_or_else(|e| panic!("{name} does not validate: {e}\n{text}"));
        let compiled = family::compile(&Request {
            cascade: &c,
            options: &KernelOptions::default(),
            defines: &[],
            instantiate: &build,
        })
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}\n{text}"));
        assert!(!compiled.modules().is_empty(), "{name}");
        let err = difference(&c, seed);
        assert!(err < 1e-9, "{name}: relative difference {err}\n{text}");
        // A GPU check compares f32 kernels with the f64 reference: the generator keeps
        // every value well inside f32 (seed 1172 once reached 5e59).
        let values = evaluate_in_order(&c, &random_inputs(&c, seed), &topological_order(&c))
            .expect("interpreter");
        for (h, t) in c.tensors.iter() {
            if let Some(data) = values.get(h) {
                let largest = data.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(
                    largest < 1e12,
                    "{name}: `{}` reaches {largest}\n{text}",
                    t.name
                );
            }
        }
    }
}

/// The backward cascade of every example `grad` differentiates (at small sizes) lowers to
/// point kernels that match the interpreter of that backward cascade: `check --grad` on a
/// GPU compares the same two things.
#[test]
fn backward_cascades_lower_to_point_kernels_that_match_the_interpreter() {
    use einattn_passes::grad::{grad, GradOptions};
    let sizes: &[(&str, &[(&str, u64)])] = &[
        ("attention_1pass", &[("M", 64), ("D", 8), ("TILE", 16)]),
        ("attention_causal", &[("N", 64), ("D", 8), ("TILE", 16)]),
        (
            "attention_sliding_window",
            &[("N", 64), ("D", 8), ("TILE", 16), ("W", 20)],
        ),
        ("linear_attention", &[("N", 32), ("D", 8)]),
        ("linear_causal", &[("N", 32), ("D", 8)]),
        ("sigmoid_attention", &[("N", 32), ("D", 8)]),
    ];
    for (name, defines) in sizes {
        let forward = load(name, defines);
        let g =
            grad(&forward, &GradOptions { wrt: None }).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let err = difference(&g.cascade, 5);
        assert!(err < 1e-9, "{name}: relative difference {err}");
    }
}

/// The recurrences the backward tests differentiate, at small sizes.
const RECURRENCES: &[(&str, &[(&str, u64)])] = &[
    ("lightning", &[("N", 32), ("D", 4), ("BLOCK", 8)]),
    ("gla", &[("T", 12), ("DK", 3), ("DV", 4)]),
    ("gated_linear", &[("N", 32), ("D", 4), ("BLOCK", 8)]),
    ("delta_rule", &[("T", 12), ("DK", 3), ("DV", 4)]),
    (
        "delta_rule_chunked",
        &[("N", 32), ("CHUNK", 8), ("DK", 3), ("DV", 4)],
    ),
];

/// `einattn grad` of an example with respect to every input and parameter, printed and
/// read back as a user's backward file would be: (name, text, cascade).
fn backward_of(name: &str, sizes: &[(&str, u64)]) -> (String, String, Cascade) {
    use einattn_passes::grad::{grad, GradOptions};
    let forward = load(name, sizes);
    let wrt = Some(
        forward
            .inputs()
            .map(|h| forward.tensors[h].name.clone())
            .collect(),
    );
    let g = grad(&forward, &GradOptions { wrt }).unwrap_or_else(|d| panic!("{name}: {d:?}"));
    let text = einattn_ir::print::print(&g.cascade);
    let bw_name = format!("{name}_grad.ein");
    let bw = einattn_dsl::compile_source(&bw_name, &text, &[])
        .unwrap_or_else(|e| panic!("{bw_name}: {}\n{text}", e.render(&bw_name, &text)));
    (bw_name, text, bw)
}

/// The backward cascades of the recurrences (`einattn grad`): their adjoint states are
/// reverse recurrences, which only the general lowering takes; its point kernels run them
/// down their rank and match the cascade interpreter.
#[test]
fn backward_recurrences_lower_to_point_kernels_that_match_the_interpreter() {
    use einattn_backends::family::general::program::PointKernel;
    use einattn_backends::family::{self, CompileError, KernelOptions, Request};
    for (name, sizes) in RECURRENCES {
        let (bw_name, text, bw) = backward_of(name, sizes);
        let build = |d: &[(String, u64)]| {
            einattn_dsl::compile_source(&bw_name, &text, d)
                .map_err(|e| CompileError::Source(e.items().to_vec()))
        };
        let compiled = family::compile(&Request {
            cascade: &bw,
            options: &KernelOptions::default(),
            defines: &[],
            instantiate: &build,
        })
        .unwrap_or_else(|e| panic!("{bw_name} does not compile: {e}\n{text}"));
        assert!(!compiled.modules().is_empty(), "{bw_name}");
        let program = lower(&bw, None, "k");
        let reverse = program
            .kernels
            .iter()
            .filter(|k| matches!(k, PointKernel::Recurrent { reverse: true, .. }))
            .count();
        assert!(reverse > 0, "{bw_name}: no reverse recurrent kernel");
        for seed in [1, 2] {
            let err = difference(&bw, seed);
            assert!(
                err < 1e-12,
                "{bw_name} seed {seed}: relative difference {err}"
            );
        }
    }
}

/// The reverse recurrences' kernels (a step loop counting down) assemble for sm_80 and
/// sm_90a without spills.
#[test]
fn reverse_recurrent_kernels_assemble() {
    use einattn_backends::family::general::program::PointKernel;
    use einattn_backends::family::general::ptx::print;
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::Target;
    let Some(ptxas) = ptxas_for_test("reverse_recurrent_kernels_assemble") else {
        return;
    };
    for (name, sizes) in RECURRENCES {
        let (bw_name, _, bw) = backward_of(name, sizes);
        let program = lower(&bw, None, "k");
        for k in &program.kernels {
            if !matches!(k, PointKernel::Recurrent { reverse: true, .. }) {
                continue;
            }
            for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
                let ptx = print(&program, k, target);
                assert!(
                    ptx.text.contains("sub.s64"),
                    "{bw_name}: no count-down\n{}",
                    ptx.text
                );
                let r = assemble(&ptxas, &ptx.text, arch).unwrap_or_else(|e| {
                    panic!("{bw_name} {} {arch}: {e}\n{}", ptx.entry, ptx.text)
                });
                assert!(!r.spills(), "{bw_name} {}: {r:?}", ptx.entry);
            }
        }
    }
}
