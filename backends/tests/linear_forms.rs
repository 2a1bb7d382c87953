//! The linear family's normal forms (issue 14): decays in any spelling linear in the
//! query-key distance, and feature maps on Q and K. Each form compiles through the
//! families to the linear kernels; its pre-kernels' point program and the linear kernel's
//! Tile program, run on the CPU one after the other as the manifest launches them, compute
//! what the cascade interpreter computes; every kernel assembles without spills.

use einattn_backends::family::general::interp::{run as run_points, Memory};
use einattn_backends::family::linear::{compile_linear, first_reading, LinearKernels, Strategy};
use einattn_backends::family::{self, CompileError, Compiled, KernelOptions, Request};
use einattn_backends::reference::relative_error;
use einattn_backends::tile::interp::{run as run_tile, Bindings};
use einattn_backends::Target;
use einattn_ir::cascade::{Cascade, ExtentSource, TensorKind};
use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::validate::topological_order;
use std::collections::HashMap;

/// The forms, as source paths from the repository root, with the sizes they run at.
const FORMS: &[(&str, &[(&str, u64)])] = &[
    ("examples/linear_feature_map.ein", &[("N", 130)]),
    (
        "tests/filetests/linear_forms/decay_gamma.ein",
        &[("N", 130)],
    ),
    (
        "tests/filetests/linear_forms/decay_distance_first.ein",
        &[("N", 100)],
    ),
    (
        "tests/filetests/linear_forms/decay_head_slopes.ein",
        &[("N", 130), ("H", 4)],
    ),
    (
        "tests/filetests/linear_forms/decay_scalar.ein",
        &[("N", 70)],
    ),
    (
        "tests/filetests/linear_forms/decay_gamma_chunked.ein",
        &[("N", 200), ("BLOCK", 8)],
    ),
    (
        "tests/filetests/linear_forms/feature_map_inline.ein",
        &[("N", 90)],
    ),
    (
        "tests/filetests/linear_forms/feature_map_decay.ein",
        &[("N", 130), ("B", 2)],
    ),
    (
        "tests/filetests/linear_forms/feature_map_scaled.ein",
        &[("N", 100)],
    ),
    (
        "tests/filetests/linear_forms/feature_map_noncausal.ein",
        &[("N", 90)],
    ),
];

fn source(path: &str) -> (String, String) {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    (full, text)
}

/// Compiles `path` at `sizes` through the families (as `einattn compile` does).
fn compile(
    path: &str,
    sizes: &[(&str, u64)],
    options: &KernelOptions,
) -> (Cascade, Box<dyn Compiled>) {
    let (full, text) = source(path);
    let build = |d: &[(String, u64)]| {
        einattn_dsl::compile_source(&full, &text, d)
            .map_err(|e| CompileError::Source(e.items().to_vec()))
    };
    let defines: Vec<(String, u64)> = sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let c = build(&defines).unwrap_or_else(|e| panic!("{path}: {e}"));
    let compiled = family::compile(&Request {
        cascade: &c,
        options,
        defines: &defines,
        instantiate: &build,
    })
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    (c, compiled)
}

/// The linear kernels of `path` at `sizes` (the single-pass strategy), read and confirmed
/// as the family does.
fn linear_kernels(path: &str, sizes: &[(&str, u64)]) -> (Cascade, LinearKernels) {
    let (full, text) = source(path);
    let build = |d: &[(String, u64)]| {
        einattn_dsl::compile_source(&full, &text, d).map_err(|e| e.render(&full, &text))
    };
    let defines: Vec<(String, u64)> = sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let c = build(&defines).unwrap_or_else(|e| panic!("{e}"));
    let hypothesis = first_reading(&c).unwrap_or_else(|d| panic!("{path}: {}", d.message));
    let mut small = defines.clone();
    for (rank, extent) in &hypothesis.shrinkable {
        if let ExtentSource::Symbol(name) = &c.ranks[*rank].source {
            small.retain(|(n, _)| n != name);
            small.push((name.clone(), *extent));
        }
    }
    let small = build(&small).unwrap_or_else(|e| panic!("{e}"));
    let k = compile_linear(
        &c,
        &small,
        &KernelOptions::default(),
        None,
        Some(Strategy::SinglePass),
    )
    .unwrap_or_else(|e| panic!("{path}: {}", e.message()));
    (c, k)
}

#[test]
fn every_form_takes_the_linear_path_and_matches_the_interpreter() {
    for &(path, sizes) in FORMS {
        let (_, through_families) = compile(path, sizes, &KernelOptions::default());
        assert_eq!(through_families.family(), "linear", "{path}");
        let (c, k) = linear_kernels(path, sizes);
        let compiled: &dyn Compiled = &k;
        let explain = compiled.explain();
        let modules = compiled.modules();
        let m = &k.matched;
        let inputs = random_inputs(&c, 9);
        let want = evaluate_in_order(&c, &inputs, &topological_order(&c))
            .expect("interpreter")
            .get(m.o.tensor)
            .expect("output")
            .stored()
            .into_owned();
        // The pre-kernels: their point program on the CPU, fed by name.
        let mut written: HashMap<String, Vec<f64>> = HashMap::new();
        let pre: Vec<_> = modules[..modules.len() - 1]
            .iter()
            .filter_map(|m| match &m.program {
                family::KernelProgram::Points(p) => Some(p),
                family::KernelProgram::Tile(_) => None,
            })
            .collect();
        assert_eq!(
            pre.len(),
            m.maps.len() + usize::from(m.derived.is_some()),
            "{path}: one pre-kernel per map and one for a computed rate"
        );
        if let Some(program) = pre.first() {
            let by_name: HashMap<String, TensorData> = c
                .tensors
                .iter()
                .filter(|(_, t)| matches!(t.kind, TensorKind::Input | TensorKind::Param))
                .filter_map(|(h, t)| inputs.get(&h).map(|d| (t.name.clone(), d.clone())))
                .collect();
            let memory = run_points(program, Memory::new(program, &by_name).expect("memory"))
                .unwrap_or_else(|e| panic!("{path}: the pre-kernels fail: {e}"));
            for (s, slot) in program.slots.iter().enumerate() {
                if slot.kind == family::general::program::SlotKind::Output {
                    written.insert(slot.name.clone(), memory.stored(s));
                }
            }
        }
        // The linear kernel reads the pre-kernels' scratch (16-bit for mapped inputs).
        let core_name = |l: &family::Layout| {
            let mapped = m.maps.iter().find(|f| f.mapped == l.tensor);
            mapped.map(|f| f.mapped)
        };
        let tensor = |l: &family::Layout| {
            let values = match core_name(l) {
                Some(t) => {
                    let name = m
                        .prologue
                        .as_ref()
                        .and_then(|p| p.writes.iter().find(|(_, c)| *c == Some(t)))
                        .map(|(h, _)| p_name(m, *h))
                        .expect("a written map");
                    written[&name].clone()
                }
                None => inputs[&l.tensor].stored().into_owned(),
            };
            l.host(values.iter().map(|&x| m.spec.elem.round(x)).collect())
        };
        let rate: Vec<Vec<f64>> = match (&m.derived, m.decay_param) {
            (Some(d), _) => vec![written[&d.name].iter().map(|&x| x as f32 as f64).collect()],
            (None, Some(p)) => vec![inputs[&p].stored().into_owned()],
            (None, None) => vec![],
        };
        let mut io = Bindings {
            tensors: vec![
                tensor(&m.q),
                tensor(&m.k),
                tensor(&m.v),
                m.o.host(vec![f64::NAN; m.o.elements as usize]),
            ],
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: vec![],
            head_params: rate,
            tokens: vec![],
            chunk_base: 0,
            q_offset: 0,
            chunk_total: 0,
            states: vec![],
        };
        let program = modules
            .last()
            .and_then(|m| m.program.tile())
            .expect("a Tile program");
        run_tile(program, m.problem(), &mut io).expect("tile interpreter runs");
        let got = m.o.from_bnhd(
            &io.tensors[3].data,
            m.batch as usize,
            m.n as usize,
            m.heads as usize,
            m.spec.value_dim as usize,
        );
        let err = relative_error(&got, &want);
        assert!(err < 2e-2, "{path}: relative error {err}\n{explain}");
        // The family's f64 formula (the check reference past the interpreter's reach) runs
        // the pre-kernels' cascade and the recurrence: it is the interpreter's answer.
        let (formula, _) = compiled.formula(&inputs);
        let exact = relative_error(&formula, &want);
        assert!(exact < 1e-9, "{path}: the formula differs by {exact}");
        // The manifest launches the pre-kernels first; they and the kernel agree on scratch.
        let manifest = compiled.manifest();
        assert_eq!(manifest.launch.len(), modules.len(), "{path}");
        let mut scratch: HashMap<&str, (einattn_backends::abi::Dtype, u64)> = HashMap::new();
        for kernel in &manifest.kernels {
            kernel.check().unwrap_or_else(|e| panic!("{path}: {e}"));
            for s in &kernel.scratch {
                let seen = scratch.entry(&s.name).or_insert((s.dtype, s.elements));
                assert_eq!(*seen, (s.dtype, s.elements), "{path}: scratch `{}`", s.name);
            }
        }
        eprintln!(
            "{path}: relative error {err:.2e}, {} kernels",
            modules.len()
        );
    }
}

fn p_name(
    m: &einattn_backends::family::linear::LinearMatch,
    h: einattn_ir::Handle<einattn_ir::Tensor>,
) -> String {
    m.prologue
        .as_ref()
        .map(|p| p.cascade.tensors[h].name.clone())
        .unwrap_or_default()
}

/// Cascades the normal forms still do not read fall through to the next family that
/// takes them (the attention kernel without normalization, or the general lowering), with
/// the linear family's reason in words.
#[test]
fn what_is_not_linear_attention_falls_through_with_a_reason() {
    for (path, sizes, reason, family) in [
        (
            "tests/filetests/linear_forms/decay_quadratic.ein",
            &[][..],
            "not causal linear attention with this decay",
            "softmax",
        ),
        (
            "examples/gla.ein",
            &[][..],
            "gate per key dimension (GLA)",
            "general",
        ),
    ] {
        let (_, compiled) = compile(path, sizes, &KernelOptions::default());
        assert_eq!(compiled.family(), family, "{path}");
        let explain = compiled.explain();
        let line = explain
            .lines()
            .find(|l| l.starts_with("not linear attention"))
            .unwrap_or_else(|| panic!("{path}: no linear reason in\n{explain}"));
        assert!(line.contains(reason), "{path}: {line}");
    }
}

/// Every kernel of every form (pre-kernels and linear kernels, each strategy) assembles
/// for sm_80 and sm_90a without spills.
#[test]
fn every_form_assembles_without_spills() {
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    let Some(ptxas) = ptxas_for_test("every_form_assembles_without_spills") else {
        return;
    };
    for &(path, _) in FORMS {
        for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
            for strategy in ["single", "chunked", "lookback"] {
                let options = KernelOptions {
                    target,
                    strategy: Some(strategy.into()),
                    ..KernelOptions::default()
                };
                let (full, text) = source(path);
                let build = |d: &[(String, u64)]| {
                    einattn_dsl::compile_source(&full, &text, d)
                        .map_err(|e| CompileError::Source(e.items().to_vec()))
                };
                let c = build(&[]).expect("builds");
                let compiled = match family::compile(&Request {
                    cascade: &c,
                    options: &options,
                    defines: &[],
                    instantiate: &build,
                }) {
                    Ok(k) => k,
                    // Non-causal attention has one strategy.
                    Err(e) if strategy != "single" => {
                        eprintln!("{path} {strategy}: {e}");
                        continue;
                    }
                    Err(e) => panic!("{path}: {e}"),
                };
                for module in compiled.modules() {
                    let r = assemble(&ptxas, &module.ptx.text, arch)
                        .unwrap_or_else(|e| panic!("{}: {e}", module.ptx.entry));
                    assert!(
                        !r.spills(),
                        "{} spills on {arch}:\n{}",
                        module.ptx.entry,
                        r.log
                    );
                }
            }
        }
    }
}
