//! Property tests of the structural rewrites: rank split, online normalizer, split-K and
//! causal chunking, each on random shapes and inputs against the reference interpreter.

mod rewrite_support;

use einattn_ir::Cascade;
use einattn_passes::rewrite::{chunk, normalizer, split};
use proptest::prelude::*;
use rewrite_support::{assert_equivalent, compile, example};

/// Causal softmax attention in 2-pass form: masked scores, so tiles may be fully masked.
const CAUSAL_2PASS: &str = "kernel causal_2pass
size N = 8
size D = 2
rank e: D
rank f: D
rank m: N
rank p: N
input Q[p, e]: f32
input K[m, e]: f32
input V[m, f]: f32
output AV[p, f]: f32
S[m, p] = Q[p, e] * K[m, e] where m <= p
GM[p] = max[m] S[m, p]
SN[m, p] = exp(S[m, p] - GM[p])
SD[p] = SN[m, p]
SNV[p, f] = SN[m, p] * V[m, f]
AV[p, f] = SNV[p, f] / SD[p]
";

/// A window that hides every key of row 0 and the first tiles of later rows, with the
/// maximum itself read out: exactly -inf where a row sees no key (not the finite start of
/// a running max), which `EMPTY` tells apart.
const WINDOW_MAX: &str = "kernel window_max
size N = 8
size D = 2
size W = 3
rank e: D
rank f: D
rank m: N
rank p: N
input Q[p, e]: f32
input K[m, e]: f32
input V[m, f]: f32
output EMPTY[p]: f32
output SD[p]: f32
output SNV[p, f]: f32
S[m, p] = Q[p, e] * K[m, e] where m < p and p - m <= W
GM[p] = max[m] S[m, p]
SN[m, p] = exp(S[m, p] - GM[p])
SD[p] = SN[m, p]
SNV[p, f] = SN[m, p] * V[m, f]
EMPTY[p] = GM[p] < -1e300
";

/// Causal linear attention without decay (lambda = 1).
const CAUSAL_LINEAR: &str = "kernel causal_linear
size N = 8
size D = 2
rank d: D
rank e: D
rank m: N
rank p: N
input Q[p, d]: f32
input K[m, d]: f32
input V[m, e]: f32
output O[p, e]: f32
S[p, m] = Q[p, d] * K[m, d] where p >= m
O[p, e] = S[p, m] * V[m, e]
";

fn divisor(n: u64, pick: u64) -> u64 {
    let divisors: Vec<u64> = (1..=n).filter(|t| n.is_multiple_of(*t)).collect();
    divisors[(pick as usize) % divisors.len()]
}

/// Splits the rank named `rank` with a tile picked among the divisors of its extent.
fn split_named(c: &Cascade, rank: &str, pick: u64) -> (Cascade, u64) {
    let r = c.rank_by_name(rank).expect("rank exists");
    let tile = divisor(c.ranks[r].extent, pick);
    let mut out = c.clone();
    split::split_rank(&mut out, r, tile).expect("the rank splits");
    (out, tile)
}

fn online(c: &Cascade, rank: &str, pick: u64) -> Cascade {
    let (split, _) = split_named(c, rank, pick);
    let r = c.rank_by_name(rank).expect("rank exists");
    let group = normalizer::find_group(&split, r).expect("a max-normalized group");
    normalizer::online(&split, &group)
}

fn split_k(c: &Cascade, rank: &str, pick: u64) -> Cascade {
    let (split, _) = split_named(c, rank, pick);
    let r = c.rank_by_name(rank).expect("rank exists");
    let group = normalizer::find_group(&split, r).expect("a max-normalized group");
    normalizer::split_k(&split, &group)
}

#[test]
fn split_rank_rejects_a_tile_that_does_not_divide() {
    let c = compile(&example("attention_3pass.ein"), &[("M", 6), ("D", 2)]);
    let m = c.rank_by_name("m").expect("rank m");
    let mut out = c.clone();
    assert!(split::split_rank(&mut out, m, 4).is_err());
}

#[test]
fn the_online_form_has_one_recurrence_per_statistic() {
    let c = compile(&example("attention_2pass.ein"), &[("M", 8), ("D", 2)]);
    let out = online(&c, "m", 2);
    let recurrences = out
        .einsums
        .iter()
        .filter(|(_, e)| e.recurrence.is_some())
        .count();
    // running max, running denominator, running numerator
    assert_eq!(recurrences, 3, "{}", einattn_ir::print::print(&out));
}

#[test]
fn no_group_without_an_exponential_of_the_difference() {
    let source = "kernel plain
size M = 4
rank m: M
rank p: M
input X[m, p]: f32
output S[p]: f32
GM[p] = max[m] X[m, p]
S[p] = X[m, p] - GM[p]
";
    let c = compile(source, &[]);
    let (split, _) = split_named(&c, "m", 1);
    let m = c.rank_by_name("m").expect("rank m");
    assert!(normalizer::find_group(&split, m).is_none());
}

#[test]
fn no_chunking_without_a_causal_mask() {
    let c = compile(&example("in/linear_left_first.ein"), &[("N", 4), ("D", 2)]);
    assert!(chunk::find(&c).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn split_rank_preserves_semantics(
        m in 1u64..10, d in 1u64..4, pick in any::<u64>(), seed in any::<u64>(), causal in any::<bool>(),
    ) {
        let c = if causal {
            compile(CAUSAL_2PASS, &[("N", m), ("D", d)])
        } else {
            compile(&example("attention_3pass.ein"), &[("M", m), ("D", d)])
        };
        let (out, _) = split_named(&c, "m", pick);
        assert_equivalent(&c, &out, seed);
    }

    #[test]
    fn online_normalizer_preserves_semantics(
        m in 1u64..10, d in 1u64..4, pick in any::<u64>(), seed in any::<u64>(), causal in any::<bool>(),
    ) {
        let c = if causal {
            compile(CAUSAL_2PASS, &[("N", m), ("D", d)])
        } else {
            compile(&example("attention_2pass.ein"), &[("M", m), ("D", d)])
        };
        assert_equivalent(&c, &online(&c, "m", pick), seed);
    }

    #[test]
    fn online_normalizer_is_exact_where_masks_empty_whole_tiles_and_rows(
        m in 1u64..12, d in 1u64..3, w in 1u64..5, pick in any::<u64>(), seed in any::<u64>(),
    ) {
        let c = compile(WINDOW_MAX, &[("N", m), ("D", d), ("W", w)]);
        let out = online(&c, "m", pick);
        // The running max starts finite; nothing clamps the rescale.
        let text = einattn_ir::print::print(&out);
        prop_assert!(text.contains("= -1e38"), "{}", text);
        prop_assert!(!text.contains(", -1e38)"), "{}", text);
        assert_equivalent(&c, &out, seed);
    }

    #[test]
    fn online_normalizer_is_not_only_for_attention(
        t in 1u64..4, d in 1u64..4, v in 1u64..10, pick in any::<u64>(), seed in any::<u64>(),
    ) {
        // The log-partition and entropy cascade, after division delay (2-pass form).
        let source = example("lm_head_entropy.ein")
            .replace("P[t, v]  = E[t, v] / SE[t]\n", "")
            .replace("EZ[t]    = P[t, v] * Z[t, v]", "EZN[t]   = E[t, v] * Z[t, v]\nEZ[t]    = EZN[t] / SE[t]");
        let c = compile(&source, &[("T", t), ("D", d), ("VOCAB", v)]);
        assert_equivalent(&c, &online(&c, "v", pick), seed);
    }

    #[test]
    fn split_k_preserves_semantics(
        m in 1u64..10, d in 1u64..4, pick in any::<u64>(), seed in any::<u64>(), causal in any::<bool>(),
    ) {
        let c = if causal {
            compile(CAUSAL_2PASS, &[("N", m), ("D", d)])
        } else {
            compile(&example("attention_2pass.ein"), &[("M", m), ("D", d)])
        };
        assert_equivalent(&c, &split_k(&c, "m", pick), seed);
    }

    #[test]
    fn causal_chunking_preserves_semantics(
        blocks in 1u64..4, block in 1u64..4, d in 1u64..3, h in 1u64..3, seed in any::<u64>(), decay in any::<bool>(),
    ) {
        let n = blocks * block;
        let c = if decay {
            compile(&example("lightning_naive.ein"), &[("N", n), ("D", d), ("H", h)])
        } else {
            compile(CAUSAL_LINEAR, &[("N", n), ("D", d)])
        };
        let found = chunk::find(&c).expect("a causal linear form");
        prop_assert_eq!(found.decay.is_some(), decay);
        let out = chunk::chunk(&c, &found, block).expect("the block divides");
        assert_equivalent(&c, &out, seed);
    }
}
