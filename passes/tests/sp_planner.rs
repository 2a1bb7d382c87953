//! The SP planner on the examples: what it classifies, which schemes apply, and what it
//! picks.

use einattn_ir::Cascade;
use einattn_passes::sp::{self, SchemeKind, SpOptions, StateRole};
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

#[test]
fn smoke() {
    let c = compile(
        "lightning.ein",
        &[("N", 262144), ("B", 4), ("H", 16), ("D", 128)],
    );
    let d = sp::plan_sequence_parallel(&c, &SpOptions::new(2)).expect("plans");
    println!("{}", d.report.render_text());
    let c = compile(
        "attention_causal.ein",
        &[("N", 65536), ("B", 1), ("H", 16), ("D", 128)],
    );
    let d = sp::plan_sequence_parallel(&c, &SpOptions::new(2)).expect("plans");
    println!("{}", d.report.render_text());
    let _ = (
        SchemeKind::Lasp2,
        StateRole::Extremum {
            op: einattn_ir::ReduceOp::Max,
        },
    );
}

#[test]
fn debug_dump() {
    let c = compile(
        "attention_causal.ein",
        &[("N", 256), ("B", 1), ("H", 2), ("D", 8), ("TILE", 16)],
    );
    println!("{}", einattn_ir::print::print(&c));
    for (_, e) in c.einsums.iter() {
        if c.tensors[e.output.tensor].name == "C" || c.tensors[e.output.tensor].name == "RD" {
            println!("{:?}", e.expr);
        }
    }
    let c = compile(
        "lightning.ein",
        &[("N", 262144), ("B", 4), ("H", 16), ("D", 128)],
    );
    let seq = sp::SequenceRanks::detect(&c).unwrap();
    let cls = sp::classify(&c, seq);
    let mut a = sp::schemes::PairAnalyzer::new(&c, &cls, Default::default());
    let w1 = [sp::local::Window {
        rank: seq.query.declared,
        start: 0,
        len: 131072,
    }];
    let r = a.report(&w1, false).unwrap().clone();
    let h = c.rank_by_name("h").unwrap();
    let w2 = [sp::local::Window {
        rank: h,
        start: 0,
        len: 8,
    }];
    let r2 = a.report(&w2, false).unwrap().clone();
    for (x, y) in r.einsums.iter().zip(&r2.einsums) {
        println!(
            "{} {} {} {} | {} {} {}",
            x.einsum,
            x.points,
            x.contraction_flops,
            x.scalar_flops,
            y.points,
            y.contraction_flops,
            y.scalar_flops
        );
    }
}
