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

/// A reverse recurrence (its init gives the last step) runs down its rank: a discounted
/// suffix sum, by the interpreter against plain loops; a step body running down (a state
/// and a member reading it) too; and both print as text that compiles back.
#[test]
fn reverse_recurrences_run_down_their_rank() {
    let source = "\
kernel suffix
size T = 6
rank t: T
rank d: 3
input X[t, d]: f32
param a[d]: f32
output Y[t, d]: f32
output Z[t, d]: f32
R[t, d] = a[d] * R[t + 1, d] + X[t, d]
init R[T, d] = 1
Y[t, d] = R[t, d]
# a step body: P reads the state after this step's update, U reads P and the state before it
P[t, d] = 2 * U[t + 1, d] + X[t, d]
U[t, d] = U[t + 1, d] - P[t, d] / 4
init U[T, d] = 0.5
Z[t, d] = U[t, d] + P[t, d]
";
    let c = einattn_dsl::compile_source("suffix.ein", source, &[])
        .unwrap_or_else(|d| panic!("{}", d.render("suffix.ein", source)));
    let r = c.tensor_by_name("R").unwrap();
    let rec = c
        .einsums
        .iter()
        .find(|(_, e)| e.output.tensor == r)
        .unwrap()
        .1;
    assert!(rec.recurrence.as_ref().is_some_and(|x| x.reverse));
    assert_eq!(c.tensors[r].iterative, Some(0));
    assert_eq!(einattn_ir::validate::step_bodies(&c).len(), 1);
    let inputs = random_inputs(&c, 3);
    let values = evaluate_in_order(&c, &inputs, &topological_order(&c)).unwrap();
    let get = |name: &str| {
        values
            .get(c.tensor_by_name(name).unwrap())
            .unwrap()
            .stored()
    };
    let x = get("X");
    let a = get("a");
    let (mut r, mut u) = ([1.0f64; 3], [0.5f64; 3]);
    let (mut y, mut z) = (vec![0.0; 18], vec![0.0; 18]);
    for t in (0..6).rev() {
        for d in 0..3 {
            r[d] = a[d] * r[d] + x[t * 3 + d];
            y[t * 3 + d] = r[d];
            let p = 2.0 * u[d] + x[t * 3 + d];
            u[d] -= p / 4.0;
            z[t * 3 + d] = u[d] + p;
        }
    }
    let close =
        |got: &[f64], want: &[f64]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12);
    assert!(close(&get("Y"), &y), "{:?}\n{y:?}", get("Y"));
    assert!(close(&get("Z"), &z), "{:?}\n{z:?}", get("Z"));
    // Printed, it reads back as the same cascade.
    let printed = einattn_ir::print::print(&c);
    assert!(printed.contains("init R[T, d] = 1"), "{printed}");
    let back = einattn_dsl::compile_source("printed.ein", &printed, &[])
        .unwrap_or_else(|d| panic!("{}", d.render("printed.ein", &printed)));
    assert_eq!(
        einattn_ir::print::without_spans(&back),
        einattn_ir::print::without_spans(&c)
    );
}
