//! `einattn check`: the kernels of a compile on fresh random inputs against the reference.

use crate::given::Given;
use crate::whole::{describe_launches, Inputs, KernelText, Whole};
use crate::{device, ExecError, Result};
use einattn_backends::abi::{Dtype, Manifest, TensorRole};
use einattn_backends::reference::relative_error;
use einattn_backends::Compiled;
use einattn_ir::cascade::Cascade;
use einattn_ir::interp::{evaluate_in_order, random_inputs};
use einattn_ir::validate::topological_order;
use std::fmt::Write as _;
use std::path::Path;

/// Above this many multiply-adds the tree-walking interpreter takes longer than a check
/// should; the family's direct f64 formula (checked against the interpreter by the test
/// suite) stands in for it.
pub const INTERPRETER_MAC_LIMIT: u64 = 40_000_000;

/// The relative error a 16-bit kernel must stay under.
pub const TOLERANCE: f64 = 2e-2;

/// Inputs drawn as the interpreter draws them, or given by the user, with the tensors the
/// kernels store in 16 bits rounded to that type so both sides see the same numbers.
pub fn prepared_inputs(
    cascade: &Cascade,
    manifest: &Manifest,
    seed: u64,
    given: &Given,
) -> Result<Inputs> {
    let mut inputs = random_inputs(cascade, seed);
    given.apply(cascade, &mut inputs)?;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    for t in manifest.kernels.iter().flat_map(|k| &k.tensors) {
        if t.role != TensorRole::Input || !matches!(t.dtype, Dtype::Bf16 | Dtype::F16) {
            continue;
        }
        let Some(h) = cascade.tensor_by_name(&t.name) else {
            continue;
        };
        if let Some(data) = inputs.get_mut(&h) {
            let per_thread = data.values.len().div_ceil(threads).max(1);
            let dtype = t.dtype;
            std::thread::scope(|scope| {
                for chunk in data.values.chunks_mut(per_thread) {
                    scope.spawn(move || {
                        chunk.iter_mut().for_each(|x| *x = device::round(dtype, *x))
                    });
                }
            });
        }
    }
    Ok(inputs)
}

/// Reference values by output name, and how they were computed.
pub type Reference = (std::collections::HashMap<String, Vec<f64>>, String);

/// The f64 reference and its name: every output by the cascade interpreter when the
/// problem is within its limit, else the main output by the family's formula when its work
/// is at most `formula_limit` multiply-adds (`None`: no reference).
pub fn reference(
    compiled: &dyn Compiled,
    inputs: &Inputs,
    formula_limit: u64,
) -> Result<Option<Reference>> {
    let cascade = compiled.cascade();
    let manifest = compiled.manifest();
    let work = compiled.interpreter_work();
    // A family without a formula of its own (the general lowering) is checked on every
    // output by the interpreter, up to the formula's limit. One with a formula uses it past
    // the interpreter's limit even at equal work: the formula is threaded, the interpreter
    // is not (a softmax check at N = 4096 took minutes in the interpreter).
    let formula_work = compiled.formula_work();
    if work <= INTERPRETER_MAC_LIMIT || (formula_work.is_none() && work <= formula_limit) {
        let values = evaluate_in_order(cascade, inputs, &topological_order(cascade))
            .map_err(|e| ExecError::Input(format!("the interpreter failed: {e}")))?;
        let mut out = std::collections::HashMap::new();
        for name in output_names(&manifest) {
            let t = cascade
                .tensor_by_name(&name)
                .ok_or_else(|| ExecError::Input(format!("no output `{name}`")))?;
            let data = values
                .get(t)
                .ok_or_else(|| ExecError::Input("the interpreter produced no output".into()))?;
            out.insert(name, data.stored().into_owned());
        }
        return Ok(Some((out, "the cascade interpreter (f64)".to_string())));
    }
    if formula_work.is_none_or(|w| w > formula_limit) {
        return Ok(None);
    }
    let (values, name) = compiled.formula(inputs);
    let main = output_name(&manifest)?;
    Ok(Some((
        [(main, values)].into_iter().collect(),
        format!("{name} (size above the interpreter's limit)"),
    )))
}

/// Every tensor the kernels write, in contract order.
pub fn output_names(manifest: &Manifest) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in manifest.kernels.iter().flat_map(|k| &k.tensors) {
        if t.role == TensorRole::Output && !out.contains(&t.name) {
            out.push(t.name.clone());
        }
    }
    out
}

/// The main output ([`Manifest::main_output`]), or an error when no kernel writes one.
pub fn output_name(manifest: &Manifest) -> Result<String> {
    manifest
        .main_output()
        .map(str::to_string)
        .ok_or_else(|| ExecError::Input("no kernel writes an output".into()))
}

/// The problem a contract was compiled for, as `name=value` pairs.
pub fn problem_line(manifest: &Manifest) -> String {
    let problem = manifest
        .kernels
        .last()
        .and_then(|k| k.family.get("problem"))
        .and_then(|p| p.as_object());
    match problem {
        Some(p) => p
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => manifest.cascade.clone(),
    }
}

/// `einattn check`: GPU output against the reference on fresh random inputs (or the
/// values the user gave); the report and whether it passes (NaN never does). With
/// `outputs_to`, every output the kernels wrote is saved there as `NAME.npy`.
pub fn check(
    compiled: &dyn Compiled,
    seed: u64,
    given: &Given,
    outputs_to: Option<&Path>,
) -> Result<(String, bool)> {
    let manifest = compiled.manifest();
    let cascade = compiled.cascade();
    let inputs = prepared_inputs(cascade, &manifest, seed, given)?;
    let kernels: Vec<KernelText> = compiled
        .modules()
        .iter()
        .map(|m| (&m.contract, m.ptx.text.as_str()))
        .collect();
    let whole = Whole::load(0, &kernels, cascade, &inputs)?;
    whole.run()?;
    let (want, reference_name) = reference(compiled, &inputs, u64::MAX)?
        .ok_or_else(|| ExecError::Input("no reference for this check".into()))?;
    // The worst output decides; a NaN anywhere fails.
    let mut errors = Vec::new();
    if let Some(dir) = outputs_to {
        save_outputs(&whole, &manifest, cascade, dir)?;
    }
    for name in output_names(&manifest) {
        let Some(reference) = want.get(&name) else {
            continue;
        };
        errors.push((
            name.clone(),
            relative_error(&whole.output(&name)?, reference),
        ));
    }
    let err = errors.iter().map(|(_, e)| *e).fold(0.0f64, |a, e| {
        if a.is_nan() || e.is_nan() {
            f64::NAN
        } else {
            a.max(e)
        }
    });
    let pass = !errors.is_empty() && err < TOLERANCE;
    let launched = whole.resources()?;
    let mut s = String::new();
    let _ = writeln!(s, "device: {}", whole.device);
    let _ = writeln!(s, "kernel: {}", describe_launches(&launched));
    let _ = writeln!(
        s,
        "problem: {}; seed {seed}; reference: {reference_name}",
        problem_line(&manifest)
    );
    if !given.is_empty() {
        let _ = writeln!(s, "given: {}", given.describe());
    }
    if let Some(dir) = outputs_to {
        let _ = writeln!(s, "outputs written to {}", dir.display());
    }
    if errors.len() > 1 {
        for (name, e) in &errors {
            let _ = writeln!(s, "  {name}: ||out - ref|| / ||ref|| = {e:.3e}");
        }
    }
    let _ = writeln!(
        s,
        "{}: ||out - ref|| / ||ref|| = {err:.3e} (tolerance {TOLERANCE:.0e})",
        if pass { "PASS" } else { "FAIL" }
    );
    Ok((s, pass))
}

/// Writes every output the kernels wrote to `dir` as `NAME.npy` (f64, the cascade's shape),
/// for comparison with another implementation.
fn save_outputs(whole: &Whole, manifest: &Manifest, cascade: &Cascade, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ExecError::Input(format!("cannot create `{}`: {e}", dir.display())))?;
    for name in output_names(manifest) {
        let tensor = cascade
            .tensor_by_name(&name)
            .ok_or_else(|| ExecError::Input(format!("no output `{name}`")))?;
        let data = einattn_ir::interp::TensorData {
            shape: einattn_ir::interp::shape_of(cascade, tensor),
            values: whole.output(&name)?,
            present: None,
        };
        let path = dir.join(format!("{name}.npy"));
        crate::npy::write(&path, &data)
            .map_err(|e| ExecError::Input(format!("cannot write `{}`: {e}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use einattn_backends::family::{self, CompileError, KernelOptions, Request};

    /// Past the interpreter's work limit, a family with a formula of its own is checked by
    /// it, even when it does the interpreter's multiply-adds: the formula is threaded.
    #[test]
    fn large_softmax_cascades_are_checked_by_the_formula() {
        let text = include_str!("../../examples/attention_causal.ein");
        let build = |d: &[(String, u64)]| {
            einattn_dsl::compile_source("attention_causal.ein", text, d)
                .map_err(|e| CompileError::Source(e.items().to_vec()))
        };
        let defines = [("N".to_string(), 1024)];
        let cascade = build(&defines).expect("valid");
        let compiled = family::compile(&Request {
            cascade: &cascade,
            options: &KernelOptions::default(),
            defines: &defines,
            instantiate: &build,
        })
        .expect("compiles");
        assert_eq!(compiled.family(), "softmax");
        assert!(compiled.interpreter_work() > INTERPRETER_MAC_LIMIT);
        let inputs = random_inputs(&cascade, 1);
        let (want, name) = reference(compiled.as_ref(), &inputs, u64::MAX)
            .expect("reference")
            .expect("some reference");
        assert!(name.contains("formula"), "reference by {name}");
        let (formula, _) = compiled.formula(&inputs);
        assert!(want.get("O") == Some(&formula));
    }

    /// Past the interpreter's work limit, a family whose formula is the interpreter (the
    /// general lowering) is still checked on every output, each against its own values: a
    /// backward cascade has several outputs, and its main output is not its first.
    #[test]
    fn large_general_cascades_are_checked_on_every_output() {
        let text = "kernel three_outputs
size N = 256
size D = 256
rank n: N
rank p: N
rank d: D
rank e: D
input A[n, d]: bf16
input B[n, e]: bf16
output X[d, e]: bf16
output Y[p, d]: bf16
output Z[n, e]: bf16
X[d, e] = A[n, d] * B[n, e]
Y[p, d] = X[d, e] * B[p, e]
Z[n, e] = X[d, e] * A[n, d]
";
        let build = |d: &[(String, u64)]| {
            einattn_dsl::compile_source("three.ein", text, d)
                .map_err(|e| CompileError::Source(e.items().to_vec()))
        };
        let cascade = build(&[]).expect("valid");
        let compiled = family::compile(&Request {
            cascade: &cascade,
            options: &KernelOptions::default(),
            defines: &[],
            instantiate: &build,
        })
        .expect("compiles");
        assert!(
            compiled.interpreter_work() > INTERPRETER_MAC_LIMIT,
            "a large problem"
        );
        let inputs = random_inputs(&cascade, 1);
        let (want, _) = reference(compiled.as_ref(), &inputs, u64::MAX)
            .expect("reference")
            .expect("some reference");
        let values = evaluate_in_order(&cascade, &inputs, &topological_order(&cascade))
            .expect("interpreter");
        for name in ["X", "Y", "Z"] {
            let t = cascade.tensor_by_name(name).expect("output");
            let expected = values.get(t).expect("computed").stored().into_owned();
            assert!(
                want.get(name) == Some(&expected),
                "{name} is not its own values"
            );
        }
        // The formula alone (what a reference past `formula_limit` falls back to) is the
        // main output's, whichever output that is.
        let (formula, _) = compiled.formula(&inputs);
        let manifest = compiled.manifest();
        let main = manifest.main_output().expect("a main output");
        let t = cascade.tensor_by_name(main).expect("an output");
        assert!(
            formula == values.get(t).expect("computed").stored().into_owned(),
            "the formula is not `{main}`"
        );
    }
}
