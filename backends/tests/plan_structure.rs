//! The structure of SP plans: lightning on 2 and 4 devices and causal attention on 2, at
//! the sizes the GPU benchmarks use (their full text is in the file tests,
//! `tests/filetests/plans/`).

use einattn_backends::plan::{plan_cascade, Phase, Plan, Step};
use einattn_ir::Cascade;
use einattn_passes::sp::SpOptions;
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

/// The collectives of every rank, in order, must be the same calls with the same counts.
fn assert_collectives_line_up(plan: &Plan) {
    let signature = |r: usize| -> Vec<String> {
        plan.ranks[r]
            .steps
            .iter()
            .filter(|s| s.is_collective())
            .map(|s| match s {
                Step::AllGather {
                    send, recv, dtype, ..
                } => format!("all_gather {} {} {dtype}", send.count, recv.count),
                Step::AllToAll {
                    send,
                    count_per_peer,
                    dtype,
                    ..
                } => format!("all_to_all {} {count_per_peer} {dtype}", send.count),
                other => format!("{other:?}"),
            })
            .collect()
    };
    for r in 1..plan.ranks.len() {
        assert_eq!(signature(r), signature(0), "rank {r} vs rank 0");
    }
}

fn kernels(plan: &Plan, rank: usize) -> Vec<Phase> {
    plan.ranks[rank]
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Kernel(k) => Some(k.phase),
            _ => None,
        })
        .collect()
}

#[test]
fn lightning_lasp2_plans_gather_states_between_two_passes() {
    for p in [2u64, 4] {
        let c = compile(
            "lightning.ein",
            &[("N", 262144), ("B", 4), ("H", 16), ("D", 128)],
        );
        let (decision, plan) = plan_cascade(&c, &SpOptions::new(p)).expect("plans");
        assert_eq!(plan.scheme, "lasp2");
        assert_eq!(decision.report.chosen, "lasp2");
        assert_collectives_line_up(&plan);
        for r in 0..p as usize {
            // A state-only pass, one all-gather of 4 MiB of states (+ decays), a combine,
            // then the output pass: the kernel runs once over the chunk, plus the state pass.
            assert_eq!(
                kernels(&plan, r),
                [Phase::StateOnly, Phase::OutputWithPrefix]
            );
            let gather = plan.ranks[r].steps.iter().find_map(|s| match s {
                Step::AllGather { send, .. } => Some(send.count),
                _ => None,
            });
            let state = 4 * 16 * 128 * 128;
            assert_eq!(
                gather,
                Some(state + 16),
                "the state, and one decay per head (exp(-s[h] I))"
            );
        }
    }
}

#[test]
fn causal_attention_plans_balance_the_zigzag() {
    let c = compile(
        "attention_causal.ein",
        &[("N", 65536), ("B", 1), ("H", 16), ("D", 128)],
    );
    let (decision, plan) = plan_cascade(&c, &SpOptions::new(2)).expect("plans");
    assert_eq!(plan.scheme, decision.report.chosen);
    assert_collectives_line_up(&plan);
    // Zigzag keeps the work balanced: both ranks run the same number of partial kernels.
    let partials = |r| {
        kernels(&plan, r)
            .iter()
            .filter(|&&k| k == Phase::Partial)
            .count()
    };
    assert_eq!(partials(0), partials(1), "{}", plan.scheme);
}

#[test]
fn a_ring_plan_sends_each_block_p_minus_1_times() {
    let c = compile("attention_causal.ein", &[("N", 4096), ("H", 2), ("D", 16)]);
    let mut options = SpOptions::new(4);
    options.scheme = Some("ring_zigzag".to_string());
    let (_, plan) = plan_cascade(&c, &options).expect("plans");
    for rp in &plan.ranks {
        let exchanges = rp
            .steps
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    Step::SendRecv {
                        send: Some(_),
                        recv: Some(_),
                        ..
                    }
                )
            })
            .count();
        assert_eq!(exchanges, 3);
        let merges = rp
            .steps
            .iter()
            .filter(|s| matches!(s, Step::LseMerge { .. }))
            .count();
        assert!(merges > 0, "partials merge by log-sum-exp");
    }
}
