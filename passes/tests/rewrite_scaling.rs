//! The rewrite engine on long cascades: time near-linear in the number of Einsums and no
//! recursion as deep as a chain of temporaries.
//!
//! A chain of 5,000 temporaries took 37 s to optimize (each temporary's definition was
//! rebuilt with the whole chain below it, and egg's extractor swept every e-class once per
//! link); a chain of 20,000 feeding an output overflowed the stack.

use einattn_ir::Cascade;
use einattn_passes::rewrite::{optimize, OptimizeOptions};
use std::time::{Duration, Instant};

/// Linear attention plus `T0 = KV`, `Tk = T(k-1) + 1`, and optionally an output reading
/// the last link.
fn chain(links: usize, read_by_output: bool) -> Cascade {
    let mut text = String::from(
        "kernel chain\nsize N = 64\nsize D = 16\nrank n: N\nrank p: N\nrank d: D\nrank e: D\n\
         input Q[p, d]: f32\ninput K[n, d]: f32\ninput V[n, e]: f32\noutput O[p, e]: f32\n",
    );
    if read_by_output {
        text.push_str("output R[d, e]: f32\n");
    }
    text.push_str(
        "KV[d, e] = K[n, d] * V[n, e]\nO[p, e] = Q[p, d] * KV[d, e]\nT0[d, e] = KV[d, e]\n",
    );
    for k in 1..links {
        text.push_str(&format!("T{k}[d, e] = T{}[d, e] + 1\n", k - 1));
    }
    if read_by_output {
        text.push_str(&format!("R[d, e] = T{}[d, e]\n", links - 1));
    }
    einattn_dsl::compile_source("chain.ein", &text, &[]).expect("the chain compiles")
}

const LIMIT: Duration = Duration::from_secs(5);

#[test]
fn a_chain_of_5000_temporaries_optimizes_in_seconds() {
    let c = chain(5000, false);
    let start = Instant::now();
    let out = optimize(&c, &OptimizeOptions::default()).expect("optimizes");
    assert!(start.elapsed() < LIMIT, "{:?}", start.elapsed());
    // Nothing in the chain is cheaper rewritten: the cascade comes back whole.
    assert_eq!(out.cascade.einsums.len(), c.einsums.len());
}

#[test]
fn a_chain_of_20000_read_by_an_output_does_not_overflow_the_stack() {
    let c = chain(20000, true);
    let start = Instant::now();
    let out = optimize(&c, &OptimizeOptions::default()).expect("optimizes");
    assert!(start.elapsed() < 4 * LIMIT, "{:?}", start.elapsed());
    let r = out
        .cascade
        .tensor_by_name("R")
        .expect("R is still produced");
    assert!(out.cascade.producer(r).is_some());
}
