//! `einattn check --grad`: the values a backward cascade runs on. The forward is evaluated
//! by the interpreter on drawn inputs, an output gradient `d<O>` is drawn for each forward
//! output, and the backward's inputs are assembled from both (the forward's inputs, the
//! tensors it saves, the final steps of its states), so the backward kernels see the
//! values they would see after a real forward pass.

use crate::given::Given;
use crate::{ExecError, Result};
use einattn_backends::Compiled;
use einattn_ir::cascade::Cascade;
use einattn_ir::interp::{
    check_limits, evaluate_in_order, random_inputs, shape_of, Limits, TensorData,
};
use einattn_ir::validate::topological_order;
use einattn_passes::grad::{backward_inputs, Grad};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// The backward's inputs for `forward` at `seed`, by the names the backward gives them.
pub fn backward_given(forward: &Cascade, grad: &Grad, seed: u64) -> Result<Given> {
    // The forward runs in the interpreter: bounded, as `run` is, before anything is held.
    interpreter_bound(forward)?;
    let inputs = random_inputs(forward, seed);
    let values = evaluate_in_order(forward, &inputs, &topological_order(forward))
        .map_err(|e| ExecError::Input(format!("the forward's interpreter failed: {e}")))?;
    // Output gradients from their own stream of the generator, so that they do not repeat
    // the forward's inputs.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6772_6164);
    let output_grads: HashMap<_, _> = forward
        .outputs()
        .map(|o| {
            let shape = shape_of(forward, o);
            let n = shape.iter().product();
            let values = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            (o, TensorData::new(shape, values))
        })
        .collect();
    let by_handle =
        backward_inputs(forward, grad, &values, &output_grads).map_err(ExecError::Input)?;
    let mut tensors: Vec<(String, TensorData)> = by_handle
        .into_iter()
        .map(|(h, data)| (grad.cascade.tensors[h].name.clone(), data))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Given {
        tensors,
        ..Given::default()
    })
}

/// The interpreter's size limit for the forward, as `check --grad`'s error.
fn interpreter_bound(forward: &Cascade) -> Result<()> {
    check_limits(forward, Limits::default()).map(|_| ()).map_err(|e| {
        ExecError::Input(format!(
            "`check --grad` evaluates the forward `{}` with the interpreter: {e}\n  = help: bind smaller sizes with -D",
            forward.name
        ))
    })
}

/// `einattn check --grad`: the backward kernels (`compiled`, from `grad`'s cascade) on the
/// values a forward pass leaves, with the user's `--param`/`--input` (by backward name)
/// over them; the report and whether it passes.
pub fn check_backward(
    forward: &Cascade,
    grad: &Grad,
    compiled: &dyn Compiled,
    seed: u64,
    given: &Given,
    outputs_to: Option<&Path>,
) -> Result<(String, bool)> {
    // Sizes the interpreter refuses, then the GPU, before the forward's interpretation
    // (seconds to minutes): a machine without a GPU hears so at once.
    interpreter_bound(forward)?;
    crate::device::open(0)?;
    let mut values = backward_given(forward, grad, seed)?;
    values.params.extend(given.params.iter().cloned());
    values.files.extend(given.files.iter().cloned());
    let (report, pass) = crate::check::check(compiled, seed, &values, outputs_to)?;
    Ok((format!("backward of `{}`\n{report}", forward.name), pass))
}

#[cfg(test)]
mod tests {
    use super::*;
    use einattn_passes::grad::{grad, GradOptions};

    fn example(name: &str, defines: &[(&str, u64)]) -> Cascade {
        let path = format!("{}/../examples/{name}.ein", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("example");
        let defines: Vec<(String, u64)> =
            defines.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        einattn_dsl::compile_source(&path, &text, &defines).expect("valid")
    }

    /// The assembled inputs cover every input of the backward with its shape, and the
    /// saved forward values are the forward's (the output `AV`, the final running sum).
    #[test]
    fn the_backward_runs_on_the_forward_values_it_saves() {
        let forward = example("attention_1pass", &[("M", 128)]);
        let g = grad(&forward, &GradOptions { wrt: None }).expect("differentiable");
        let given = backward_given(&forward, &g, 3).expect("assembled");
        let backward = &g.cascade;
        let names: Vec<&str> = given.tensors.iter().map(|(n, _)| n.as_str()).collect();
        for h in backward.inputs() {
            let t = &backward.tensors[h];
            if t.kind == einattn_ir::TensorKind::Param && t.default.is_some() {
                continue;
            }
            let (_, data) = given
                .tensors
                .iter()
                .find(|(n, _)| *n == t.name)
                .unwrap_or_else(|| panic!("no value for `{}` among {names:?}", t.name));
            assert_eq!(data.shape, shape_of(backward, h), "{}", t.name);
        }
        let forward_values = evaluate_in_order(
            &forward,
            &einattn_ir::interp::random_inputs(&forward, 3),
            &topological_order(&forward),
        )
        .expect("forward");
        let av = forward.tensor_by_name("AV").expect("AV");
        let saved = &given
            .tensors
            .iter()
            .find(|(n, _)| n == "AV")
            .expect("AV saved")
            .1;
        assert_eq!(saved.values, forward_values.get(av).expect("AV").values);
        let again = backward_given(&forward, &g, 3).expect("assembled");
        assert_eq!(again, given, "the same seed gives the same values");
        assert_ne!(backward_given(&forward, &g, 4).expect("assembled"), given);
    }
}
