//! Helpers shared by the rewrite tests: compile `.ein` text at chosen sizes, and compare
//! two cascades' outputs under the reference interpreter on the same random inputs.

#![allow(dead_code)]

use einattn_ir::interp::{self, TensorData};
use einattn_ir::{Cascade, Handle, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Compiles `source`, binding each `(name, value)` whose `size` the text declares.
pub fn compile(source: &str, sizes: &[(&str, u64)]) -> Cascade {
    let defines: Vec<(String, u64)> = sizes
        .iter()
        .filter(|(n, _)| source.contains(&format!("size {n} ")))
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
    match einattn_dsl::compile_source("test.ein", source, &defines) {
        Ok(c) => c,
        Err(d) => panic!("does not compile:\n{}", d.render("test.ein", source)),
    }
}

/// The text of `examples/NAME` (or `passes/tests/in/NAME`).
pub fn example(name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = if name.starts_with("in/") {
        root.join("passes/tests").join(name)
    } else {
        root.join("examples").join(name)
    };
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn evaluate(cascade: &Cascade, inputs: &HashMap<Handle<Tensor>, TensorData>) -> interp::Values {
    let order = einattn_ir::validate::topological_order(cascade);
    interp::evaluate_in_order(cascade, inputs, &order).unwrap_or_else(|e| {
        panic!(
            "evaluation failed: {e}\n{}",
            einattn_ir::print::print(cascade)
        )
    })
}

/// The largest relative error over the outputs of `rewritten` against `original`, both
/// evaluated on inputs drawn from `seed` (matched by name). Panics when the rewritten
/// cascade does not validate or lacks an output.
pub fn max_relative_error(original: &Cascade, rewritten: &Cascade, seed: u64) -> f64 {
    if let Err(d) = einattn_ir::validate::validate(rewritten) {
        panic!(
            "rewritten cascade is invalid: {d:?}\n{}",
            einattn_ir::print::print(rewritten)
        );
    }
    let inputs = interp::random_inputs(original, seed);
    let by_name: HashMap<&str, &TensorData> = inputs
        .iter()
        .map(|(h, d)| (original.tensors[*h].name.as_str(), d))
        .collect();
    let rewritten_inputs: HashMap<Handle<Tensor>, TensorData> = rewritten
        .inputs()
        .map(|h| {
            let name = rewritten.tensors[h].name.as_str();
            let data = by_name
                .get(name)
                .unwrap_or_else(|| panic!("input `{name}` is new in the rewritten cascade"));
            (h, (*data).clone())
        })
        .collect();
    let want = evaluate(original, &inputs);
    let got = evaluate(rewritten, &rewritten_inputs);
    let mut worst = 0.0f64;
    for o in original.outputs() {
        let name = &original.tensors[o].name;
        let o2 = rewritten
            .tensor_by_name(name)
            .unwrap_or_else(|| panic!("output `{name}` is missing after the rewrite"));
        let (Some(w), Some(g)) = (want.get(o), got.get(o2)) else {
            panic!("output `{name}` was not computed");
        };
        let err = g.relative_error(w);
        worst = if err.is_nan() {
            f64::INFINITY
        } else {
            worst.max(err)
        };
    }
    worst
}

/// Asserts the outputs agree to 1e-9 (relative), printing both cascades otherwise.
pub fn assert_equivalent(original: &Cascade, rewritten: &Cascade, seed: u64) {
    let err = max_relative_error(original, rewritten, seed);
    assert!(
        err < 1e-9,
        "relative error {err:e}\n--- original\n{}\n--- rewritten\n{}",
        einattn_ir::print::print(original),
        einattn_ir::print::print(rewritten)
    );
}
