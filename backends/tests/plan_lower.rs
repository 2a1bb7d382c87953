//! Plans lowered to the kernels they launch: every lowered scheme's kernels assemble, the
//! lowered plan validates, its steps run in an order where every rank progresses, and hand
//! edits that break it are refused by validation.

use einattn_backends::family::{self, CompileError, Compiled, KernelOptions, Request};
use einattn_backends::plan::lower::lower;
use einattn_backends::plan::order::{order, Batch};
use einattn_backends::plan::validate::validate;
use einattn_backends::plan::{plan_cascade, BufferInit, Phase, Step};
use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
use einattn_ir::Cascade;
use einattn_passes::analysis::GpuModel;
use einattn_passes::sp::SpOptions;
use std::path::PathBuf;

fn source(file: &str) -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("example");
    (path.display().to_string(), text)
}

fn compiled(file: &str, defines: &[(&str, u64)]) -> Box<dyn Compiled> {
    let (name, text) = source(file);
    let defines: Vec<(String, u64)> = defines.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    let build = |d: &[(String, u64)]| -> Result<Cascade, CompileError> {
        einattn_dsl::compile_source(&name, &text, d)
            .map_err(|e| CompileError::Source(e.items().to_vec()))
    };
    let cascade = build(&defines).expect("compiles");
    family::compile(&Request {
        cascade: &cascade,
        options: &KernelOptions::default(),
        defines: &defines,
        instantiate: &build,
    })
    .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn options(p: u64, scheme: &str) -> SpOptions {
    let mut o = SpOptions::new(p);
    o.scheme = Some(scheme.to_string());
    o
}

/// Every module a lowered plan carries assembles without spills.
#[test]
fn lowered_kernels_assemble() {
    let Some(ptxas) = ptxas_for_test("lowered_kernels_assemble") else {
        return;
    };
    for (file, scheme) in [
        ("lightning.ein", "lasp2"),
        ("attention_causal.ein", "allgather_kv_zigzag"),
        ("lightning.ein", "ulysses"),
        ("attention_causal.ein", "ulysses"),
        ("attention_causal.ein", "ring_zigzag"),
        ("attention_causal.ein", "tokenring"),
        ("attention_1pass.ein", "ring"),
    ] {
        let k = compiled(file, &[("N", 4096), ("M", 4096), ("D", 128)]);
        let (_, plan) = plan_cascade(k.cascade(), &options(2, scheme)).expect("plans");
        let lowered = lower(&plan, k.as_ref(), &GpuModel::h200()).expect("lowers");
        assert!(
            lowered.kernels.manifest.kernels.len() >= 3,
            "{file} {scheme}"
        );
        for (entry, text) in &lowered.kernels.ptx {
            let report =
                assemble(&ptxas, text, "sm_80").unwrap_or_else(|e| panic!("{file} {entry}: {e}"));
            assert!(!report.spills(), "{file} {entry}: {report:?}");
        }
    }
}

/// Every step once, collectives together, every send with its receive, for the lowered
/// schemes at several device counts, driven from one process or one rank each.
#[test]
fn lowered_plans_validate_and_every_rank_progresses() {
    for (file, n, schemes) in [
        ("lightning.ein", 3072u64, vec!["lasp2", "lasp1", "ulysses"]),
        (
            "attention_causal.ein",
            4096,
            vec![
                "allgather_kv_zigzag",
                "allgather_kv",
                "ulysses",
                "ring",
                "ring_zigzag",
                "tokenring",
                "tokenring_zigzag",
            ],
        ),
        (
            "attention_1pass.ein",
            3072,
            vec!["ring", "ring_zigzag", "tokenring", "tokenring_zigzag"],
        ),
    ] {
        let k = compiled(file, &[("N", n), ("M", n)]);
        for scheme in schemes {
            for p in [2u64, 3, 4, 8] {
                let Ok((_, plan)) = plan_cascade(k.cascade(), &options(p, scheme)) else {
                    // Zigzag needs 2P chunks; Ulysses needs P to divide the heads (2 here).
                    assert!(
                        p == 3 || p == 8 || scheme == "ulysses",
                        "{file} {scheme} P={p}"
                    );
                    continue;
                };
                let lowered = lower(&plan, k.as_ref(), &GpuModel::h200())
                    .unwrap_or_else(|e| panic!("{file} {scheme} P={p}: {e}"));
                validate(&lowered.plan, &lowered.kernels).expect("validates");
                let steps: Vec<&[Step]> = plan.ranks.iter().map(|r| r.steps.as_slice()).collect();
                let ranks: Vec<usize> = plan.ranks.iter().map(|r| r.rank as usize).collect();
                let batches = order(&steps, &ranks).expect("an order");
                let mut next = vec![0usize; steps.len()];
                for batch in &batches {
                    let at = match batch {
                        Batch::Local(i, k) => vec![(*i, *k)],
                        Batch::Collective(at) => {
                            assert_eq!(at.len(), steps.len(), "a collective on every rank");
                            at.clone()
                        }
                        Batch::PointToPoint(at) => at.clone(),
                    };
                    for (i, k) in at {
                        assert_eq!(k, next[i], "{scheme} P={p}: rank {i} out of order");
                        next[i] += 1;
                    }
                }
                for (i, s) in steps.iter().enumerate() {
                    assert_eq!(next[i], s.len(), "{scheme} P={p}: steps left on rank {i}");
                    // One process per GPU: each rank alone schedules all its steps.
                    assert_eq!(order(&[s], &[ranks[i]]).expect("alone").len(), s.len());
                }
            }
        }
    }
}

/// A ring plan lowers; the same plan with a partial step that names a statistic the
/// kernel does not write (`PS` for `RD`) is refused when lowered.
#[test]
fn a_partial_without_its_statistics_is_refused() {
    let k = compiled("attention_causal.ein", &[]);
    let (_, plan) = plan_cascade(k.cascade(), &options(2, "ring")).expect("plans");
    assert!(lower(&plan, k.as_ref(), &GpuModel::h200()).is_ok());
    // The same plan offered to a family whose epilogue is a ratio of other tensors.
    let mut edited = plan.clone();
    for r in &mut edited.ranks {
        for s in &mut r.steps {
            if let Step::Kernel(kk) = s {
                for a in &mut kk.args {
                    if a.tensor == "RD" {
                        a.tensor = "PS".into();
                    }
                }
            }
        }
    }
    let err = lower(&edited, k.as_ref(), &GpuModel::h200())
        .err()
        .unwrap_or_else(|| panic!("a partial without its sum statistic was lowered"));
    assert!(err.contains("binds no statistic `RD`"), "{err}");
}

fn partial(
    p: &mut einattn_backends::plan::Plan,
) -> Option<&mut einattn_backends::plan::KernelStep> {
    p.ranks
        .iter_mut()
        .flat_map(|r| &mut r.steps)
        .find_map(|s| match s {
            Step::Kernel(k) if k.phase == Phase::Partial => Some(k),
            _ => None,
        })
}

/// Hand edits of a lowered ring plan that the GPU kernels could not honour.
#[test]
fn edits_that_break_a_ring_plan_are_refused() {
    let k = compiled("attention_causal.ein", &[("N", 2048)]);
    for scheme in ["ring", "tokenring_zigzag"] {
        let (_, plan) = plan_cascade(k.cascade(), &options(2, scheme)).expect("plans");
        let lowered = lower(&plan, k.as_ref(), &GpuModel::h200()).expect("lowers");
        let (plan, kernels) = (lowered.plan, lowered.kernels);
        assert_eq!(validate(&plan, &kernels), Ok(()));
        let refused = |edit: &dyn Fn(&mut einattn_backends::plan::Plan)| {
            let mut p = plan.clone();
            edit(&mut p);
            validate(&p, &kernels).is_err()
        };
        // Keys after the queries under a causal mask: the kernel's offset cannot be negative.
        assert!(refused(&|p| {
            if let Some(k) = partial(p) {
                k.keys[0].start = k.queries.start + 1;
            }
        }));
        // Two key ranges, or none.
        assert!(refused(&|p| {
            if let Some(k) = partial(p) {
                let r = k.keys[0];
                k.keys.push(r);
            }
        }));
        // A statistic of the wrong shape for the kernel's rows.
        assert!(refused(&|p| {
            if let Some(k) = partial(p) {
                if let Some(a) = k.args.iter_mut().find(|a| a.tensor == "RM") {
                    a.shape[2] -= 1;
                }
            }
        }));
        // A statistic left unbound.
        assert!(refused(&|p| {
            if let Some(k) = partial(p) {
                k.args.retain(|a| a.tensor != "RD");
            }
        }));
        // A merge that reads its max through other dims, or merges a region into itself.
        let merges = plan
            .ranks
            .iter()
            .flat_map(|r| &r.steps)
            .filter(|s| matches!(s, Step::LseMerge { .. }))
            .count();
        assert!(merges > 0, "{scheme}");
        assert!(refused(&|p| {
            for s in p.ranks.iter_mut().flat_map(|r| &mut r.steps) {
                if let Step::LseMerge { stats, .. } = s {
                    stats[1].max_dims = vec![2, 1, 0];
                }
            }
        }));
        assert!(refused(&|p| {
            for s in p.ranks.iter_mut().flat_map(|r| &mut r.steps) {
                if let Step::LseMerge { into, from, .. } = s {
                    *from = into.clone();
                }
            }
        }));
    }
}

#[test]
fn edits_that_break_a_plan_are_refused() {
    let k = compiled("lightning.ein", &[("N", 2048)]);
    let (_, plan) = plan_cascade(k.cascade(), &SpOptions::new(2)).expect("plans");
    let lowered = lower(&plan, k.as_ref(), &GpuModel::h200()).expect("lowers");
    let (plan, kernels) = (lowered.plan, lowered.kernels);
    assert_eq!(validate(&plan, &kernels), Ok(()));
    let refused = |edit: &dyn Fn(&mut einattn_backends::plan::Plan)| {
        let mut p = plan.clone();
        edit(&mut p);
        validate(&p, &kernels).is_err()
    };
    assert!(refused(&|p| p.tensors[0].shape[1] += 1));
    assert!(refused(&|p| {
        if let BufferInit::Pieces { pieces } = &mut p.ranks[1].buffers[0].init {
            pieces[0].slices[0].start += 1;
        }
    }));
    assert!(refused(&|p| p.ranks[0].buffers[0].elements -= 1));
    assert!(refused(&|p| p.ranks.clear()));
    assert!(refused(&|p| p.world_size = u64::MAX));
    assert!(refused(&|p| p.world_size = 1 << 40));
    assert!(refused(&|p| p.ranks[1].rank = 0));
    assert!(refused(&|p| p.ranks[0].buffers[0].dtype = "f64".into()));
    assert!(refused(&|p| {
        if let Some(Step::Kernel(k)) = p.ranks[0]
            .steps
            .iter_mut()
            .find(|s| matches!(s, Step::Kernel(_)))
        {
            k.launch = vec!["no_such_kernel".into()];
        }
    }));
    assert!(refused(&|p| {
        // One rank skips its all-gather: the collectives no longer line up.
        p.ranks[1].steps.retain(|s| !s.is_collective());
    }));
}

/// Every scheme's plan orders its memory accesses by streams and events, so an executor
/// may run each stream on its own device stream; a plan with an event removed races.
#[test]
fn plans_order_every_conflicting_access_by_their_events() {
    use einattn_backends::plan::races::check_races;
    for (file, n, schemes) in [
        ("lightning.ein", 3072u64, vec!["lasp2", "lasp1", "ulysses"]),
        (
            "attention_causal.ein",
            4096,
            vec![
                "allgather_kv",
                "allgather_kv_zigzag",
                "ring",
                "ring_zigzag",
                "tokenring",
                "tokenring_zigzag",
                "ulysses",
            ],
        ),
        (
            "attention_1pass.ein",
            3072,
            vec!["ring", "ring_zigzag", "tokenring", "tokenring_zigzag"],
        ),
    ] {
        let k = compiled(file, &[("N", n), ("M", n)]);
        for scheme in &schemes {
            for p in [2u64, 3, 4, 8] {
                let Ok((_, plan)) = plan_cascade(k.cascade(), &options(p, scheme)) else {
                    continue;
                };
                if let Err(e) = check_races(&plan) {
                    panic!("{file} {scheme} P={p}: {e}");
                }
            }
        }
    }
    // Dropping the waits of a ring plan leaves a receive racing the compute that reads it.
    let k = compiled("attention_causal.ein", &[]);
    let (_, mut plan) = plan_cascade(k.cascade(), &options(4, "ring")).expect("plans");
    for s in plan.ranks.iter_mut().flat_map(|r| &mut r.steps) {
        if let Step::Kernel(k) = s {
            k.exec.wait.clear();
        }
    }
    assert!(check_races(&plan).is_err());
}
