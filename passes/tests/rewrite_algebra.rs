//! One property test per e-graph rule: on random shapes and inputs, a cascade where the
//! rule's left-hand side occurs is rewritten by that rule alone (extraction prefers what
//! the rule added), the rule must have fired, and the interpreter must give the same
//! outputs (relative error < 1e-9, f64).

mod rewrite_support;

use einattn_passes::rewrite::algebra::{apply_rule_once, RULE_NAMES};
use proptest::prelude::*;
use rewrite_support::{assert_equivalent, compile};

/// Declarations shared by every rule's program: ranks i, k, l and inputs over them.
const HEADER: &str = "kernel rule
size I = 3
size K = 3
size L = 2
rank i: I
rank k: K
rank l: L
input A[i, k]: f32
input B[i, k]: f32
input C[i]: f32
input X[i]: f32
input Y[i]: f32
input Z[i, k, l]: f32
input U[k]: f32
param lam: f32
output O[i]: f32
";

/// A program whose terms contain each rule's left-hand side.
fn program(rule: &str) -> &'static str {
    match rule {
        "mul-commute" => "O[i] = X[i] * Y[i]",
        "mul-associate" => "O[i] = X[i] * Y[i] * C[i]",
        "mul-associate-back" => "O[i] = X[i] * (Y[i] * C[i])",
        "add-commute" => "O[i] = X[i] + Y[i]",
        "mul-div-associate" => "O[i] = X[i] / Y[i] * C[i]",
        "div-mul-associate" => "O[i] = (X[i] * C[i]) / Y[i]",
        "sum-factor-out" => "O[i] = X[i] * A[i, k]",
        "sum-factor-in" => "T[i] = A[i, k]\nO[i] = X[i] * T[i]",
        "division-delay" => "O[i] = A[i, k] / Y[i]",
        "division-hoist" => "T[i] = A[i, k]\nO[i] = T[i] / Y[i]",
        "max-add-factor-out" => "O[i] = max[k] X[i] + A[i, k]",
        "reduce-interchange" => "O[i] = Z[i, k, l]",
        "mul-distribute" => "O[i] = X[i] * (Y[i] + C[i])",
        "mul-factor" => "O[i] = X[i] * Y[i] + X[i] * C[i]",
        "div-distribute" => "O[i] = (X[i] + Y[i]) / C[i]",
        "sum-distribute" => "O[i] = A[i, k] + B[i, k]",
        "sum-merge" => "T[i] = A[i, k]\nS[i] = B[i, k]\nO[i] = T[i] + S[i]",
        "exp-of-sum" => "O[i] = exp(X[i] + Y[i])",
        "exp-product" => "O[i] = exp(X[i]) * exp(Y[i])",
        "exp-of-difference" => "O[i] = exp(X[i] - Y[i])",
        "exp-quotient" => "O[i] = exp(X[i]) / exp(Y[i])",
        "decay-factor" => "O[i] = A[i, k] * exp(-lam * (i - k))",
        "mask-hoist" => "S[i, k] = A[i, k] where k <= i\nO[i] = S[i, k] * U[k]",
        "mask-sink" => "O[i] = A[i, k] * U[k] where k <= i",
        other => panic!("no program for rule `{other}`: add one"),
    }
}

fn check_rule(rule: &str, i: u64, k: u64, l: u64, seed: u64) {
    let source = format!("{HEADER}{}\n", program(rule));
    let original = compile(&source, &[("I", i), ("K", k), ("L", l)]);
    let rewritten = apply_rule_once(&original, rule)
        .unwrap_or_else(|| panic!("rule `{rule}` did not fire on\n{source}"));
    assert_equivalent(&original, &rewritten, seed);
}

#[test]
fn every_rule_has_a_program() {
    for rule in RULE_NAMES {
        let _ = program(rule);
    }
}

#[test]
fn an_unknown_rule_is_reported_as_not_applied() {
    let original = compile(&format!("{HEADER}O[i] = X[i] * Y[i]\n"), &[]);
    assert!(apply_rule_once(&original, "no-such-rule").is_none());
}

#[test]
fn a_factor_that_mentions_the_summed_rank_stays_inside() {
    // A[i, k] depends on k: sum-factor-out must not move it out of the sum over k.
    let original = compile(&format!("{HEADER}O[i] = A[i, k] * B[i, k]\n"), &[]);
    assert!(apply_rule_once(&original, "sum-factor-out").is_none());
}

#[test]
fn a_maskable_factor_stays_inside_a_sum() {
    // M[i] is absent where i < 1; outside the sum it would make O absent instead of 0.
    let source = format!("{HEADER}M[i] = X[i] where i >= 1\nO[i] = M[i] * A[i, k]\n");
    let original = compile(&source, &[]);
    assert!(apply_rule_once(&original, "sum-factor-out").is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn rules_preserve_semantics(
        rule_index in 0..RULE_NAMES.len(),
        i in 1u64..6, k in 1u64..6, l in 1u64..4, seed in any::<u64>(),
    ) {
        check_rule(RULE_NAMES[rule_index], i, k, l, seed);
    }
}

macro_rules! rule_property {
    ($($test:ident => $rule:literal),* $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]
            $(
                #[test]
                fn $test(i in 1u64..6, k in 1u64..6, l in 1u64..4, seed in any::<u64>()) {
                    check_rule($rule, i, k, l, seed);
                }
            )*
        }
    };
}

rule_property! {
    mul_commute => "mul-commute",
    mul_associate => "mul-associate",
    mul_associate_back => "mul-associate-back",
    add_commute => "add-commute",
    mul_div_associate => "mul-div-associate",
    div_mul_associate => "div-mul-associate",
    sum_factor_out => "sum-factor-out",
    sum_factor_in => "sum-factor-in",
    division_delay => "division-delay",
    division_hoist => "division-hoist",
    max_add_factor_out => "max-add-factor-out",
    reduce_interchange => "reduce-interchange",
    mul_distribute => "mul-distribute",
    mul_factor => "mul-factor",
    div_distribute => "div-distribute",
    sum_distribute => "sum-distribute",
    sum_merge => "sum-merge",
    exp_of_sum => "exp-of-sum",
    exp_product => "exp-product",
    exp_of_difference => "exp-of-difference",
    exp_quotient => "exp-quotient",
    decay_factor => "decay-factor",
    mask_hoist => "mask-hoist",
    mask_sink => "mask-sink",
}
