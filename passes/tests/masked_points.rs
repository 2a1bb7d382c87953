//! The interval-solving point counter agrees with brute-force enumeration on small random
//! boxes and random affine masks (every relation, negative coefficients, constants that
//! empty the box or leave it whole).

use einattn_passes::analysis::points::{
    count_points, count_points_brute_force, AffineCondition, AffineRelation,
};
use proptest::prelude::*;

fn relation() -> impl Strategy<Value = AffineRelation> {
    prop_oneof![
        3 => Just(AffineRelation::AtMostZero),
        1 => Just(AffineRelation::Zero),
        1 => Just(AffineRelation::NonZero),
    ]
}

fn condition(dims: usize) -> impl Strategy<Value = AffineCondition> {
    (
        prop::collection::vec(-3i64..=3, dims),
        -8i64..=8,
        relation(),
    )
        .prop_map(|(coefs, constant, relation)| AffineCondition {
            coefs,
            constant,
            relation,
        })
}

fn case() -> impl Strategy<Value = (Vec<u64>, Vec<AffineCondition>)> {
    (1usize..=4).prop_flat_map(|dims| {
        (
            prop::collection::vec(0u64..=7, dims),
            prop::collection::vec(condition(dims), 0..=4),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn interval_count_equals_brute_force((extents, conditions) in case()) {
        prop_assert_eq!(
            count_points(&extents, &conditions),
            count_points_brute_force(&extents, &conditions)
        );
    }
}

#[test]
fn sliding_window_over_a_split_rank() {
    // m = 64*m1 + m0 over N = 1024; conditions m <= p and p - m < W = 256.
    let (n, tile, w) = (1024u64, 64u64, 256i64);
    let extents = [n / tile, tile, n];
    let causal = AffineCondition {
        coefs: vec![64, 1, -1],
        constant: 0,
        relation: AffineRelation::AtMostZero,
    };
    // p - m - W + 1 <= 0
    let window = AffineCondition {
        coefs: vec![-64, -1, 1],
        constant: 1 - w,
        relation: AffineRelation::AtMostZero,
    };
    let expected: u128 = (0..n as i64).map(|p| (p.min(w - 1) + 1) as u128).sum();
    assert_eq!(count_points(&extents, &[causal, window]), expected);
}
