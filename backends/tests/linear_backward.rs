//! The linear-attention backward kernels (`family::linear::gradient`): compiled through
//! `family::compile_gradient` from the examples' forwards, their Tile programs run by the
//! Tile IR interpreter in launch order (bound through their launch contracts, as the GPU
//! launcher binds them) against the f64 interpreter of `einattn grad`'s backward cascade;
//! which examples take these kernels; and that they assemble without spills.

use einattn_backends::abi::{Axis, LaunchContract, Source, TensorRole};
use einattn_backends::family::{self, CompileError, Compiled, KernelOptions, Request};
use einattn_backends::reference::relative_error;
use einattn_backends::tile::interp::{run, Bindings, HostTensor, Problem};
use einattn_backends::tile::{Elem, TileProgram};
use einattn_ir::cascade::Cascade;
use einattn_ir::interp::{evaluate_in_order, random_inputs};
use einattn_ir::validate::topological_order;
use einattn_passes::grad::{grad, Grad, GradOptions};
use std::collections::HashMap;

fn source(name: &str) -> (String, String) {
    let path = format!("{}/../examples/{name}.ein", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example exists");
    (path, text)
}

fn build(path: &str, text: &str, sizes: &[(String, u64)]) -> Result<Cascade, CompileError> {
    einattn_dsl::compile_source(path, text, sizes)
        .map_err(|d| CompileError::Source(d.items().to_vec()))
}

/// The forward at `sizes`, its gradient and the backward's kernels as the CLI compiles
/// them (`check --grad`, `bench --grad`).
fn compile(
    name: &str,
    sizes: &[(&str, u64)],
    options: &KernelOptions,
) -> (Cascade, Grad, Result<Box<dyn Compiled>, CompileError>) {
    let (path, text) = source(name);
    let defines: Vec<(String, u64)> = sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let forward = build(&path, &text, &defines).expect("the forward compiles");
    let g = grad(&forward, &GradOptions { wrt: None }).expect("differentiable");
    let backward_text = g.to_text(&path);
    let instantiate_forward = |s: &[(String, u64)]| build(&path, &text, s);
    let instantiate_backward = |s: &[(String, u64)]| build("backward.ein", &backward_text, s);
    let forward_request = Request {
        cascade: &forward,
        options,
        defines: &defines,
        instantiate: &instantiate_forward,
    };
    let request = Request {
        cascade: &g.cascade,
        options,
        defines: &[],
        instantiate: &instantiate_backward,
    };
    let compiled = family::compile_gradient(&forward_request, &g, &request);
    (forward, g, compiled)
}

/// The cascade tensor a program parameter named `param` is bound to by `c`.
fn bound(c: &LaunchContract, param: &str) -> String {
    match c.params.iter().find(|p| p.name == param).map(|p| &p.from) {
        Some(Source::Tensor { tensor }) => tensor.clone(),
        Some(Source::Scratch { scratch }) => scratch.clone(),
        other => panic!("{}: `{param}` bound to {other:?}", c.kernel),
    }
}

fn size(c: &LaunchContract, name: &str) -> usize {
    c.sizes[name] as usize
}

/// Runs every module's Tile program in launch order, tensors bound by the contracts' names
/// to `values` (the backward's inputs, rounded to the kernels' 16-bit type when the
/// contract says so); returns the tensors the kernels wrote.
fn run_modules(
    compiled: &dyn Compiled,
    mut values: HashMap<String, Vec<f64>>,
) -> HashMap<String, Vec<f64>> {
    let mut scratch: HashMap<String, Vec<f64>> = HashMap::new();
    let mut written = HashMap::new();
    for module in compiled.modules() {
        let program: &TileProgram = module.program.tile().expect("a Tile program");
        let c = &module.contract;
        let mut tensors = Vec::new();
        for t in &program.tensors {
            let name = bound(c, &t.name);
            let ct = c
                .tensors
                .iter()
                .find(|x| x.name == name)
                .expect("contract tensor");
            let strides = ct.strides.expect("strides");
            let data = match ct.role {
                TensorRole::Output => vec![f64::NAN; ct.elements() as usize],
                _ => {
                    let v = values
                        .get(&name)
                        .unwrap_or_else(|| panic!("no values of {name}"));
                    v.iter().map(|&x| t.elem.round(x)).collect()
                }
            };
            tensors.push(HostTensor {
                data,
                stride_b: strides.along(Axis::Batch) as usize,
                stride_n: strides.along(Axis::Seq) as usize,
                stride_h: strides.along(Axis::Head) as usize,
            });
        }
        let head_params = program
            .head_params
            .iter()
            .map(|h| values[&bound(c, &h.name)].clone())
            .collect();
        let states: Vec<Vec<f64>> = program
            .states
            .iter()
            .map(|s| {
                let name = bound(c, &s.name);
                let elements = c
                    .scratch
                    .iter()
                    .find(|x| x.name == name)
                    .expect("scratch")
                    .elements;
                scratch
                    .entry(name)
                    .or_insert_with(|| vec![0.0; elements as usize])
                    .clone()
            })
            .collect();
        assert!(program.tokens.is_empty() && program.scalars.is_empty());
        let mut io = Bindings {
            tensors,
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: vec![],
            head_params,
            states,
            chunk_base: 0,
            chunk_total: size(c, "chunk_total"),
            q_offset: 0,
            tokens: vec![],
        };
        let prob = Problem {
            batch: size(c, "batch"),
            heads: size(c, "heads"),
            kv_group: 1,
            n_q: size(c, "n_q"),
            n_k: size(c, "n_k"),
        };
        run(program, prob, &mut io).unwrap_or_else(|e| panic!("{}: {e}", program.name));
        for (s, data) in program.states.iter().zip(io.states) {
            scratch.insert(bound(c, &s.name), data);
        }
        for (t, host) in program.tensors.iter().zip(io.tensors) {
            if t.is_output {
                let name = bound(c, &t.name);
                values.insert(name.clone(), host.data.clone());
                written.insert(name, host.data);
            }
        }
    }
    written
}

/// The largest relative error of the backward kernels' gradients (run by the Tile IR
/// interpreter) against the backward cascade's interpreter, on random inputs.
fn backward_error(name: &str, sizes: &[(&str, u64)], options: &KernelOptions, seed: u64) -> f64 {
    let (_, g, compiled) = compile(name, sizes, options);
    let compiled = compiled.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        compiled.family(),
        "linear",
        "{name}: {}",
        compiled.explain()
    );
    let backward = &g.cascade;
    // (Decay rates are drawn in [0.05, 1): every head's mask decays.)
    let inputs = random_inputs(backward, seed);
    let want =
        evaluate_in_order(backward, &inputs, &topological_order(backward)).expect("interpreter");
    let values = inputs
        .iter()
        .map(|(h, d)| (backward.tensors[*h].name.clone(), d.stored().into_owned()))
        .collect();
    let got = run_modules(compiled.as_ref(), values);
    let mut worst = 0.0f64;
    for (d, _) in &g.grads {
        let dname = &backward.tensors[*d].name;
        let expect = want.get(*d).expect("gradient").stored().into_owned();
        let err = relative_error(&got[dname], &expect);
        eprintln!("{name} {sizes:?}: {dname} relative error {err:.2e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn backward_kernels_match_the_backward_cascade() {
    let default = KernelOptions::default();
    let cases: &[(&str, &[(&str, u64)])] = &[
        // Ragged: 200 tokens are 3 blocks of 64 and 8 more.
        ("lightning", &[("N", 200), ("BLOCK", 8), ("D", 64)]),
        ("lightning", &[("N", 256), ("BLOCK", 64), ("D", 128)]),
        ("lightning_naive", &[("N", 130), ("D", 64)]),
        ("linear_causal", &[("N", 70), ("D", 64)]),
        ("linear_causal", &[("N", 192), ("D", 128)]),
        ("linear_attention", &[("N", 90), ("D", 64)]),
    ];
    for (name, sizes) in cases {
        let err = backward_error(name, sizes, &default, 11);
        assert!(err < 2e-2, "{name} {sizes:?}: relative error {err}");
    }
    // The dQ kernel follows the forward's strategy: chunked and look-back too.
    for strategy in ["chunked", "lookback"] {
        let options = KernelOptions {
            strategy: Some(strategy.into()),
            chunk_tokens: (strategy == "chunked").then_some(128),
            ..KernelOptions::default()
        };
        let err = backward_error(
            "lightning",
            &[("N", 336), ("BLOCK", 8), ("D", 64)],
            &options,
            5,
        );
        assert!(err < 2e-2, "lightning, {strategy}: relative error {err}");
    }
    // Both 16-bit types.
    let f16 = KernelOptions {
        elem: Some(Elem::F16),
        ..KernelOptions::default()
    };
    let err = backward_error("linear_causal", &[("N", 100), ("D", 64)], &f16, 3);
    assert!(err < 2e-2, "linear_causal f16: relative error {err}");
}

/// Which examples' backward cascades take the linear backward kernels: the forwards read
/// as linear attention without feature maps, a computed decay or a gate (whose backward
/// also differentiates the gate); the others stay with the general lowering.
#[test]
fn linear_examples_take_the_backward_kernels() {
    let options = KernelOptions::default();
    for (name, sizes, fast) in [
        ("lightning", &[("N", 256u64), ("BLOCK", 64)][..], true),
        ("lightning_naive", &[("N", 256)][..], true),
        ("linear_causal", &[("N", 256)][..], true),
        ("linear_attention", &[("N", 256)][..], true),
        ("gated_linear", &[("N", 256), ("BLOCK", 64)][..], false),
        ("linear_feature_map", &[("N", 256)][..], false),
        ("attention_causal", &[("N", 256)][..], false),
    ] {
        let (_, g, compiled) = compile(name, sizes, &options);
        let compiled = compiled.unwrap_or_else(|e| panic!("{name}: {e}"));
        if !fast {
            assert_ne!(compiled.family(), "linear", "{name}");
            continue;
        }
        assert_eq!(
            compiled.family(),
            "linear",
            "{name}: {}",
            compiled.explain()
        );
        let entries: Vec<&str> = compiled
            .modules()
            .iter()
            .map(|m| m.ptx.entry.as_str())
            .collect();
        assert_eq!(entries.len(), 3, "{name}: {entries:?}");
        for (entry, g) in entries.iter().zip(["dq", "dk", "dv"]) {
            assert!(
                entry.starts_with(&format!("einattn_linear_bwd_{g}")),
                "{name}: {entry}"
            );
        }
        let mut outputs: Vec<String> = compiled
            .manifest()
            .kernels
            .iter()
            .flat_map(|c| c.tensors.iter().filter(|t| t.role == TensorRole::Output))
            .map(|t| t.name.clone())
            .collect();
        let mut want: Vec<String> = g
            .grads
            .iter()
            .map(|(d, _)| g.cascade.tensors[*d].name.clone())
            .collect();
        outputs.sort();
        want.sort();
        assert_eq!(outputs, want, "{name}");
    }
}

/// The backward kernels assemble for sm_80 (mma.sync) and sm_90a (wgmma) without spills,
/// d = 64 and 128, both 16-bit types, with and without the decay.
#[test]
fn backward_kernels_assemble_without_spills() {
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::Target;
    let Some(ptxas) = ptxas_for_test("linear backward_kernels_assemble_without_spills") else {
        return;
    };
    for (name, extra) in [
        ("lightning", &[("BLOCK", 64u64)][..]),
        ("linear_causal", &[][..]),
    ] {
        for d in [64u64, 128] {
            for elem in [Elem::Bf16, Elem::F16] {
                for target in [Target::Sm80, Target::Sm90a] {
                    let options = KernelOptions {
                        target,
                        elem: Some(elem),
                        ..KernelOptions::default()
                    };
                    let mut sizes = vec![("N", 8192u64), ("D", d), ("B", 4), ("H", 16)];
                    sizes.extend_from_slice(extra);
                    let (_, _, compiled) = compile(name, &sizes, &options);
                    let compiled = compiled.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(compiled.family(), "linear");
                    for m in compiled.modules() {
                        let r = assemble(&ptxas, &m.ptx.text, target.name())
                            .unwrap_or_else(|e| panic!("{} {}: {e}", m.ptx.entry, target.name()));
                        assert!(
                            !r.spills(),
                            "{} spills on {}:\n{}",
                            m.ptx.entry,
                            target.name(),
                            r.log
                        );
                        eprintln!(
                            "{} {}: {} registers",
                            m.ptx.entry,
                            target.name(),
                            r.registers
                        );
                    }
                }
            }
        }
    }
}

/// A reverse program walks the whole sequence in one CTA: chunked or look-back programs
/// (whose chunks run in parallel) and query-tiled ones are refused.
#[test]
fn only_whole_sequential_programs_run_in_reverse() {
    use einattn_backends::family::linear::program::{
        lightning_part, lightning_reverse, Decay, LinearSchedule, LinearSpec, Part,
    };
    let spec = LinearSpec {
        head_dim: 64,
        value_dim: 64,
        elem: Elem::Bf16,
        decay: Decay::PerHead("s".into()),
        causal: true,
    };
    let sched = LinearSchedule::default_for(&spec);
    let (reverse, _) = lightning_reverse(&spec, &sched).expect("the reverse program");
    assert!(reverse.reverse && reverse.validate().is_ok());
    for part in [Part::ChunkOutputs { chunk_tiles: 2 }, Part::LookBack] {
        let (mut p, _) = lightning_part(&spec, &sched, part).expect("program");
        p.reverse = true;
        assert!(p.validate().is_err(), "{part:?} in reverse");
    }
    let gated = LinearSpec {
        decay: Decay::Gate("G".into()),
        ..spec
    };
    assert!(lightning_reverse(&gated, &sched).is_err());
}
