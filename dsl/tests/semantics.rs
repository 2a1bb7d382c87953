//! Lowering means what the examples say: cascades written differently for the same
//! function agree under the reference interpreter (small sizes).

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

/// Evaluates every cascade on the same named inputs and returns the named output of each.
fn outputs(cascades: &[&Cascade], output: &str) -> Vec<TensorData> {
    let by_name: HashMap<String, TensorData> = random_inputs(cascades[0], 7)
        .into_iter()
        .map(|(h, d)| (cascades[0].tensors[h].name.clone(), d))
        .collect();
    cascades
        .iter()
        .map(|c| {
            let inputs = c
                .inputs()
                .filter_map(|h| by_name.get(&c.tensors[h].name).map(|d| (h, d.clone())))
                .collect();
            let values = evaluate_in_order(c, &inputs, &topological_order(c)).unwrap();
            values
                .get(c.tensor_by_name(output).unwrap())
                .unwrap()
                .clone()
        })
        .collect()
}

#[test]
fn softmax_attention_in_one_two_and_three_passes_agree() {
    let d = [("M", 16), ("D", 4), ("TILE", 4)];
    let (a, b, c) = (
        compile("attention_3pass", &d),
        compile("attention_2pass", &d),
        compile("attention_1pass", &d),
    );
    let out = outputs(&[&a, &b, &c], "AV");
    assert!(out[1].relative_error(&out[0]) < 1e-12);
    assert!(
        out[2].relative_error(&out[0]) < 1e-12,
        "{}",
        out[2].relative_error(&out[0])
    );
}

#[test]
fn lightning_attention_matches_its_quadratic_form() {
    let d = [("N", 16), ("D", 4), ("BLOCK", 4), ("H", 2)];
    let (fast, naive) = (compile("lightning", &d), compile("lightning_naive", &d));
    let out = outputs(&[&naive, &fast], "O");
    assert!(
        out[1].relative_error(&out[0]) < 1e-10,
        "{}",
        out[1].relative_error(&out[0])
    );
}
