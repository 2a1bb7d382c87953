//! SP plans executed on the CPU (simulated collectives over the reference interpreter)
//! equal the single-device interpreter, for every scheme the planner emits.

use einattn_backends::plan::{execute_plan, plan_cascade, Plan, Step};
use einattn_ir::interp::{self, TensorData};
use einattn_ir::{Cascade, Handle, Tensor};
use einattn_passes::sp::SpOptions;
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

fn compile(name: &str, defines: &[(&str, u64)]) -> Cascade {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let defines: Vec<(String, u64)> = defines.iter().map(|&(k, v)| (k.to_string(), v)).collect();
    einattn_dsl::compile_source(name, &source, &defines)
        .unwrap_or_else(|e| panic!("{name} does not compile: {e:?}"))
}

fn reference(
    cascade: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
) -> HashMap<Handle<Tensor>, TensorData> {
    let order = einattn_ir::validate::topological_order(cascade);
    let values = interp::evaluate_in_order(cascade, inputs, &order)
        .expect("the single-device cascade evaluates");
    cascade
        .outputs()
        .map(|h| (h, values.tensors[&h].clone()))
        .collect()
}

/// Plans `cascade` with `scheme` on `devices`, runs the plan, and returns the largest
/// relative error of an output against the single-device interpreter, with the plan.
fn sp_error(cascade: &Cascade, scheme: &str, devices: u64, seed: u64) -> (f64, Plan) {
    let mut options = SpOptions::new(devices);
    options.scheme = Some(scheme.to_string());
    let (_, plan) =
        plan_cascade(cascade, &options).unwrap_or_else(|e| panic!("{scheme} on {devices}: {e}"));
    let inputs = interp::random_inputs(cascade, seed);
    let want = reference(cascade, &inputs);
    let got = execute_plan(cascade, &plan, &inputs)
        .unwrap_or_else(|e| panic!("{scheme} on {devices}: {e}"));
    let mut worst = 0.0f64;
    for (h, w) in &want {
        let g = &got[h];
        assert!(
            g.values.iter().all(|v| v.is_finite()),
            "{scheme} on {devices}: non-finite output"
        );
        let e = g.relative_error(w);
        assert!(!e.is_nan(), "{scheme} on {devices}: NaN error");
        worst = worst.max(e);
    }
    (worst, plan)
}

fn lightning(devices: u64, blocks_per_device: u64, batch: u64) -> Cascade {
    let block = 4;
    compile(
        "lightning.ein",
        &[
            ("N", devices * blocks_per_device * block),
            ("BLOCK", block),
            ("D", 3),
            ("H", 2),
            ("B", batch),
        ],
    )
}

fn causal(devices: u64, tiles_per_chunk: u64, zigzag: bool) -> Cascade {
    let tile = 4;
    let chunks = if zigzag { 2 * devices } else { devices };
    compile(
        "attention_causal.ein",
        &[
            ("N", chunks * tiles_per_chunk * tile),
            ("TILE", tile),
            ("D", 3),
            ("H", 2),
            ("B", 1),
        ],
    )
}

const DEVICES: [u64; 4] = [2, 3, 4, 8];

#[test]
fn lightning_lasp2_equals_one_device() {
    for p in DEVICES {
        let (e, _) = sp_error(&lightning(p, 2, 1), "lasp2", p, 11 + p);
        assert!(e < 1e-9, "P={p}: relative error {e:e}");
    }
}

#[test]
fn lightning_lasp1_equals_one_device() {
    for p in DEVICES {
        let (e, plan) = sp_error(&lightning(p, 2, 1), "lasp1", p, 21 + p);
        assert!(e < 1e-9, "P={p}: relative error {e:e}");
        // The prefix travels: every rank but the last sends once, every rank but the first receives.
        let sends = plan
            .ranks
            .iter()
            .flat_map(|r| &r.steps)
            .filter(|s| matches!(s, Step::SendRecv { send: Some(_), .. }))
            .count();
        assert_eq!(sends as u64, p - 1);
    }
}

#[test]
fn causal_allgather_kv_equals_one_device() {
    for p in DEVICES {
        let (e, _) = sp_error(&causal(p, 2, false), "allgather_kv", p, 31 + p);
        assert!(e < 1e-9, "P={p}: relative error {e:e}");
    }
}

#[test]
fn causal_ring_equals_one_device() {
    for p in DEVICES {
        let (e, _) = sp_error(&causal(p, 2, false), "ring", p, 41 + p);
        assert!(e < 1e-9, "P={p}: relative error {e:e}");
    }
}

#[test]
fn causal_zigzag_ring_equals_one_device() {
    for p in DEVICES {
        let (e, _) = sp_error(&causal(p, 1, true), "ring_zigzag", p, 51 + p);
        assert!(e < 1e-9, "P={p}: relative error {e:e}");
    }
}

#[test]
fn causal_zigzag_allgather_and_tokenring_equal_one_device() {
    for p in DEVICES {
        for scheme in ["allgather_kv_zigzag", "tokenring", "tokenring_zigzag"] {
            let zig = scheme.ends_with("zigzag");
            let (e, _) = sp_error(&causal(p, if zig { 1 } else { 2 }, zig), scheme, p, 61 + p);
            assert!(e < 1e-9, "{scheme} P={p}: relative error {e:e}");
        }
    }
}

#[test]
fn ulysses_equals_one_device() {
    for p in [2u64, 4] {
        let c = compile(
            "attention_causal.ein",
            &[("N", p * 8), ("TILE", 4), ("D", 3), ("H", 4), ("B", 2)],
        );
        let (e, _) = sp_error(&c, "ulysses", p, 71 + p);
        assert!(e < 1e-9, "attention P={p}: relative error {e:e}");
        let c = compile(
            "lightning.ein",
            &[("N", p * 8), ("BLOCK", 4), ("D", 3), ("H", 4), ("B", 2)],
        );
        let (e, _) = sp_error(&c, "ulysses", p, 81 + p);
        assert!(e < 1e-9, "lightning P={p}: relative error {e:e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn lightning_lasp_any_shape(p in prop::sample::select(DEVICES.to_vec()), blocks in 1u64..3, batch in 1u64..3, seed in any::<u64>(), lasp1 in any::<bool>()) {
        let scheme = if lasp1 { "lasp1" } else { "lasp2" };
        let (e, _) = sp_error(&lightning(p, blocks, batch), scheme, p, seed);
        prop_assert!(e < 1e-9, "{} P={}: relative error {:e}", scheme, p, e);
    }

    #[test]
    fn causal_softmax_any_shape(p in prop::sample::select(DEVICES.to_vec()), tiles in 1u64..3, seed in any::<u64>(), which in 0usize..3) {
        let scheme = ["allgather_kv", "ring", "ring_zigzag"][which];
        let zig = scheme.ends_with("zigzag");
        let (e, _) = sp_error(&causal(p, tiles, zig), scheme, p, seed);
        prop_assert!(e < 1e-9, "{} P={}: relative error {:e}", scheme, p, e);
    }
}
