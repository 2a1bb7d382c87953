//! Exact counts of the points of a box that satisfy affine conditions, without
//! enumerating the box.
//!
//! Dimensions no condition mentions contribute their extent as a factor. Of the mentioned
//! dimensions, all but the largest are enumerated; along the largest, each condition is
//! linear in one unknown, so the points form an interval (minus the few points excluded by
//! `!=` conditions) whose length is computed directly. A causal mask over `N x N` costs
//! `N` steps rather than `N^2`.

/// `sum(coefs[d] * x[d]) + constant REL 0`, with `0 <= x[d] < extents[d]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AffineCondition {
    /// One coefficient per dimension of the box.
    pub coefs: Vec<i64>,
    pub constant: i64,
    pub relation: AffineRelation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AffineRelation {
    /// `form <= 0`
    AtMostZero,
    /// `form == 0`
    Zero,
    /// `form != 0`
    NonZero,
}

impl AffineCondition {
    /// Whether the condition holds at `point` (one index per dimension).
    pub fn holds(&self, point: &[i64]) -> bool {
        let form: i64 = self.constant
            + self
                .coefs
                .iter()
                .zip(point)
                .map(|(c, x)| c * x)
                .sum::<i64>();
        match self.relation {
            AffineRelation::AtMostZero => form <= 0,
            AffineRelation::Zero => form == 0,
            AffineRelation::NonZero => form != 0,
        }
    }
}

/// Counts the points `x` with `0 <= x[d] < extents[d]` at which every condition holds.
/// Conditions must have one coefficient per dimension (missing ones count as zero).
pub fn count_points(extents: &[u64], conditions: &[AffineCondition]) -> u128 {
    if extents.contains(&0) {
        return 0;
    }
    let coef = |c: &AffineCondition, d: usize| c.coefs.get(d).copied().unwrap_or(0);
    let involved: Vec<usize> = (0..extents.len())
        .filter(|&d| conditions.iter().any(|c| coef(c, d) != 0))
        .collect();
    let free: u128 = (0..extents.len())
        .filter(|d| !involved.contains(d))
        .map(|d| extents[d] as u128)
        .product();

    // Conditions over no dimension are constants: they hold everywhere or nowhere.
    if involved.is_empty() {
        let all_hold = conditions.iter().all(|c| c.holds(&[]));
        return if all_hold { free } else { 0 };
    }

    // Solve along the largest dimension; enumerate the others.
    let solved = involved
        .iter()
        .copied()
        .max_by_key(|&d| (extents[d], std::cmp::Reverse(d)))
        .unwrap_or(involved[0]);
    let enumerated: Vec<usize> = involved.iter().copied().filter(|&d| d != solved).collect();
    let solved_max = extents[solved] as i64 - 1;

    // Per condition: the coefficient of the solved dimension and of each enumerated one.
    let solved_coefs: Vec<i64> = conditions.iter().map(|c| coef(c, solved)).collect();
    let enum_coefs: Vec<Vec<i64>> = conditions
        .iter()
        .map(|c| enumerated.iter().map(|&d| coef(c, d)).collect())
        .collect();

    // The innermost enumerated dimension runs in a tight loop that only adds its
    // coefficient; the others advance an odometer and rebuild the per-condition base.
    let (outer_dims, inner_extent) = match enumerated.split_last() {
        Some((&inner, outer)) => (outer.len(), extents[inner] as i64),
        None => (0, 1),
    };
    let inner_coefs: Vec<i64> = enum_coefs
        .iter()
        .map(|c| {
            if enumerated.is_empty() {
                0
            } else {
                c[outer_dims]
            }
        })
        .collect();
    let mut values = vec![0i64; outer_dims];
    let mut base = vec![0i64; conditions.len()];
    let mut partial = vec![0i64; conditions.len()];
    let mut excluded: Vec<i64> = Vec::new();
    let mut count: u128 = 0;
    loop {
        for (ci, cond) in conditions.iter().enumerate() {
            base[ci] = cond.constant
                + enum_coefs[ci][..outer_dims]
                    .iter()
                    .zip(&values)
                    .map(|(c, x)| c * x)
                    .sum::<i64>();
        }
        for inner in 0..inner_extent {
            for ci in 0..conditions.len() {
                partial[ci] = base[ci] + inner_coefs[ci] * inner;
            }
            count += interval_count(
                conditions,
                &solved_coefs,
                &partial,
                solved_max,
                &mut excluded,
            );
        }

        // Odometer over the outer enumerated dimensions, last fastest.
        let mut d = outer_dims;
        loop {
            if d == 0 {
                return count * free;
            }
            d -= 1;
            values[d] += 1;
            if values[d] < extents[enumerated[d]] as i64 {
                break;
            }
            values[d] = 0;
        }
    }
}

/// The number of `x` in `[0, solved_max]` with `solved_coefs[c] * x + partial[c] REL 0` for
/// every condition `c`.
#[inline]
fn interval_count(
    conditions: &[AffineCondition],
    solved_coefs: &[i64],
    partial: &[i64],
    solved_max: i64,
    excluded: &mut Vec<i64>,
) -> u128 {
    let mut lo = 0i64;
    let mut hi = solved_max;
    excluded.clear();
    for (ci, cond) in conditions.iter().enumerate() {
        let (a, p) = (solved_coefs[ci], partial[ci]);
        match cond.relation {
            AffineRelation::AtMostZero => restrict_le(a, p, &mut lo, &mut hi),
            AffineRelation::Zero => {
                restrict_le(a, p, &mut lo, &mut hi);
                restrict_le(-a, -p, &mut lo, &mut hi);
            }
            AffineRelation::NonZero => {
                if a == 0 {
                    if p == 0 {
                        return 0;
                    }
                } else if (-p) % a == 0 {
                    excluded.push(-p / a);
                }
            }
        }
        if lo > hi {
            return 0;
        }
    }
    if excluded.is_empty() {
        return (hi - lo + 1) as u128;
    }
    excluded.sort_unstable();
    excluded.dedup();
    let holes = excluded.iter().filter(|&&x| lo <= x && x <= hi).count() as i64;
    (hi - lo + 1 - holes) as u128
}

/// Narrows `[lo, hi]` to the `x` with `a * x + partial <= 0`.
fn restrict_le(a: i64, partial: i64, lo: &mut i64, hi: &mut i64) {
    if a == 0 {
        if partial > 0 {
            *hi = *lo - 1;
        }
    } else if a == 1 {
        // Unit coefficients are the common case (`m <= p`): no division.
        *hi = (*hi).min(-partial);
    } else if a == -1 {
        *lo = (*lo).max(partial);
    } else if a > 0 {
        *hi = (*hi).min(floor_div(-partial, a));
    } else {
        // Dividing by a negative coefficient flips the inequality.
        *lo = (*lo).max(ceil_div(-partial, a));
    }
}

fn floor_div(n: i64, d: i64) -> i64 {
    let q = n / d;
    if n % d != 0 && ((n < 0) != (d < 0)) {
        q - 1
    } else {
        q
    }
}

fn ceil_div(n: i64, d: i64) -> i64 {
    let q = n / d;
    if n % d != 0 && ((n < 0) == (d < 0)) {
        q + 1
    } else {
        q
    }
}

/// Counts by visiting every point: the reference for tests. Exponential; small boxes only.
pub fn count_points_brute_force(extents: &[u64], conditions: &[AffineCondition]) -> u128 {
    if extents.contains(&0) {
        return 0;
    }
    let mut point = vec![0i64; extents.len()];
    let mut count = 0u128;
    loop {
        if conditions.iter().all(|c| c.holds(&point)) {
            count += 1;
        }
        let mut d = extents.len();
        loop {
            if d == 0 {
                return count;
            }
            d -= 1;
            point[d] += 1;
            if point[d] < extents[d] as i64 {
                break;
            }
            point[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(coefs: &[i64], constant: i64) -> AffineCondition {
        AffineCondition {
            coefs: coefs.to_vec(),
            constant,
            relation: AffineRelation::AtMostZero,
        }
    }

    #[test]
    fn causal_is_triangular() {
        // m - p <= 0 over m, p < 1000
        let n = 1000u64;
        assert_eq!(
            count_points(&[n, n], &[le(&[1, -1], 0)]),
            (n * (n + 1) / 2) as u128
        );
    }

    #[test]
    fn divisions_round_toward_the_right_side() {
        assert_eq!(floor_div(-7, 2), -4);
        assert_eq!(floor_div(7, -2), -4);
        assert_eq!(floor_div(7, 2), 3);
        assert_eq!(ceil_div(-7, 2), -3);
        assert_eq!(ceil_div(7, -2), -3);
        assert_eq!(ceil_div(7, 2), 4);
        assert_eq!(ceil_div(-7, -2), 4);
    }

    #[test]
    fn no_conditions_is_the_box() {
        assert_eq!(count_points(&[3, 4, 5], &[]), 60);
        assert_eq!(count_points(&[3, 0, 5], &[]), 0);
    }

    #[test]
    fn constant_false_condition_empties() {
        assert_eq!(count_points(&[3, 4], &[le(&[0, 0], 1)]), 0);
        assert_eq!(count_points(&[3, 4], &[le(&[0, 0], 0)]), 12);
    }
}
