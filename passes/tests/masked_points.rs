//! The closed-form point counter agrees with brute-force enumeration on small random
//! boxes and random affine masks (every relation, negative coefficients, constants that
//! empty the box or leave it whole, coefficients as large as tile sizes), and counts masks
//! over sequences of 2^31 and more without visiting them.

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
            Some(count_points_brute_force(&extents, &conditions))
        );
    }

    /// Tile-sized coefficients (`64 * m1 + m0`) and offsets: the floors of non-unit lines.
    #[test]
    fn large_coefficients_equal_brute_force((extents, conditions) in wide_case()) {
        prop_assert_eq!(
            count_points(&extents, &conditions),
            Some(count_points_brute_force(&extents, &conditions))
        );
    }
}

fn wide_condition(dims: usize) -> impl Strategy<Value = AffineCondition> {
    (
        prop::collection::vec(
            prop_oneof![3 => -3i64..=3, 1 => -70i64..=70, 1 => Just(64i64), 1 => Just(-64i64)],
            dims,
        ),
        -200i64..=200,
        relation(),
    )
        .prop_map(|(coefs, constant, relation)| AffineCondition {
            coefs,
            constant,
            relation,
        })
}

fn wide_case() -> impl Strategy<Value = (Vec<u64>, Vec<AffineCondition>)> {
    (1usize..=4).prop_flat_map(|dims| {
        (
            prop::collection::vec(1u64..=12, dims),
            prop::collection::vec(wide_condition(dims), 0..=4),
        )
    })
}

fn le(coefs: &[i64], constant: i64) -> AffineCondition {
    AffineCondition {
        coefs: coefs.to_vec(),
        constant,
        relation: AffineRelation::AtMostZero,
    }
}

#[test]
fn causal_over_a_split_rank_at_two_to_the_31() {
    // m = 64 * m1 + m0 <= p over N = 2^31: N (N + 1) / 2 points, without visiting N of them
    // (the enumerating counter took seconds here).
    let n: u64 = 1 << 31;
    let start = std::time::Instant::now();
    let count = count_points(&[n / 64, 64, n], &[le(&[64, 1, -1], 0)]);
    assert_eq!(count, Some(u128::from(n) * u128::from(n + 1) / 2));
    assert!(start.elapsed().as_millis() < 500, "{:?}", start.elapsed());
}

#[test]
fn sliding_window_at_two_to_the_40() {
    // m <= p and p - m < W over N = 2^40, split by 128, with a `!=` diagonal removed.
    let (n, w): (u64, i64) = (1 << 40, 4096);
    let causal = le(&[128, 1, -1], 0);
    let window = le(&[-128, -1, 1], 1 - w);
    let off_diagonal = AffineCondition {
        coefs: vec![128, 1, -1],
        constant: 0,
        relation: AffineRelation::NonZero,
    };
    let w = w as u128;
    let n128 = u128::from(n);
    // Rows p < W see p + 1 keys, the rest W; the diagonal removes one per row.
    let expected = w * (w + 1) / 2 + (n128 - w) * w - n128;
    assert_eq!(
        count_points(&[n / 128, 128, n], &[causal, window, off_diagonal]),
        Some(expected)
    );
}

#[test]
fn three_long_dimensions_are_refused_not_guessed() {
    // i <= j <= k with every extent 2^31: the third dimension would be enumerated.
    let n: u64 = 1 << 31;
    let conds = [le(&[1, -1, 0], 0), le(&[0, 1, -1], 0)];
    assert_eq!(count_points(&[n, n, n], &conds), None);
    // The same mask over a short third dimension is counted exactly.
    let small = [8, 8, 8];
    assert_eq!(
        count_points(&small, &conds),
        Some(count_points_brute_force(&small, &conds))
    );
}

#[test]
fn extents_near_the_top_of_u64_do_not_wrap() {
    let big = u64::MAX;
    // Every point of a 2^64 - 1 square with x <= y: exact, in 128 bits.
    let count = count_points(&[big, big], &[le(&[1, -1], 0)]);
    let b = u128::from(big);
    assert_eq!(count, Some(b * (b + 1) / 2));
    // Three such dimensions overflow 128 bits: no count rather than a wrapped one.
    assert_eq!(count_points(&[big, big, big], &[]), None);
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
    assert_eq!(count_points(&extents, &[causal, window]), Some(expected));
}
