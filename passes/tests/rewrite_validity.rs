//! The optimizer returns valid cascades only: a rewrite whose result the validator rejects
//! is not applied (its analysis is empty, which used to look cheapest of all) and is named
//! in the log.

use einattn_passes::rewrite::{optimize, OptimizeOptions};

#[test]
fn a_rewrite_with_an_invalid_result_is_not_applied() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/in/ps_over_parent_rank.ein"
    );
    let source = std::fs::read_to_string(path).expect("the input");
    let cascade = einattn_dsl::compile_source("ps_over_parent_rank.ein", &source, &[])
        .expect("the input compiles");
    let out = optimize(&cascade, &OptimizeOptions::default()).expect("optimizes");
    if let Err(problems) = einattn_ir::validate::validate(&out.cascade) {
        panic!("optimize returned an invalid cascade: {problems:?}");
    }
    // What it returns prints as text that compiles back.
    let text = einattn_ir::print::print(&out.cascade);
    if let Err(d) = einattn_dsl::compile_source("optimized.ein", &text, &[]) {
        panic!("{}", d.render("optimized.ein", &text));
    }
    let log = out.render_log();
    for r in &out.rejected {
        assert!(log.contains(&format!("not applied: {}", r.rule)), "{log}");
        assert!(!r.problem.is_empty());
    }
    // Nothing was applied that did not make the cascade cheaper.
    assert!(log.contains("after: "), "{log}");
    assert!(
        !log.contains("-> 0 pass(es) over memory, 0 bytes, 0 FLOPs"),
        "{log}"
    );
}
