//! Exact counts of the points of a box that satisfy affine conditions, in time that does
//! not grow with the box's extents.
//!
//! Dimensions no condition mentions contribute their extent as a factor. Of the mentioned
//! dimensions, the two largest are solved in closed form and the others (tile ranks, in
//! practice: a few dozen values) are enumerated. With the largest dimension `y` solved,
//! each condition bounds `y` by a line in the second largest `x`: the count at `x` is
//! `max(0, floor(min upper) - ceil(max lower) + 1)`. Floor and ceiling are monotone, so
//! which line is the smallest upper (largest lower) bound at an integer `x` is decided by
//! the real-valued lines, and it changes only where two lines cross. Between consecutive
//! crossings the count is a sum of floors of one linear function, which `floor_sum` adds
//! up in logarithmic time. A causal mask over `N x N` costs a handful of steps, not `N`.
//!
//! `==` is two inequalities; `!=` is counted by inclusion and exclusion over its
//! equalities. All arithmetic is checked: a count that cannot be done exactly within
//! [`ENUMERATION_LIMIT`] enumerated points, or whose arithmetic would overflow 128 bits,
//! is `None` rather than a wrong number.

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
        let form: i128 = i128::from(self.constant)
            + self
                .coefs
                .iter()
                .zip(point)
                .map(|(&c, &x)| i128::from(c) * i128::from(x))
                .sum::<i128>();
        match self.relation {
            AffineRelation::AtMostZero => form <= 0,
            AffineRelation::Zero => form == 0,
            AffineRelation::NonZero => form != 0,
        }
    }
}

/// The most points of the enumerated dimensions (all but the two largest mentioned ones)
/// one count visits. Masks over a query and a key rank, split into tiles or not, stay far
/// below it (`tile x tile`); three or more long dimensions under one mask exceed it.
pub const ENUMERATION_LIMIT: u128 = 1 << 18;

/// The most `!=` conditions one count takes (inclusion and exclusion visits `2^k` sets).
pub const NONZERO_LIMIT: usize = 8;

/// Counts the points `x` with `0 <= x[d] < extents[d]` at which every condition holds.
/// Conditions must have one coefficient per dimension (missing ones count as zero).
/// `None` when the count would need more than [`ENUMERATION_LIMIT`] enumerated points or
/// more than [`NONZERO_LIMIT`] `!=` conditions, or when it overflows 128-bit arithmetic.
pub fn count_points(extents: &[u64], conditions: &[AffineCondition]) -> Option<u128> {
    if extents.contains(&0) {
        return Some(0);
    }
    let dims = extents.len();
    let form = |c: &AffineCondition| Form {
        coefs: (0..dims)
            .map(|d| i128::from(c.coefs.get(d).copied().unwrap_or(0)))
            .collect(),
        constant: i128::from(c.constant),
    };
    let mut at_most: Vec<Form> = Vec::new();
    let mut nonzero: Vec<Form> = Vec::new();
    for c in conditions {
        let f = form(c);
        match c.relation {
            AffineRelation::AtMostZero => at_most.push(f),
            AffineRelation::Zero => {
                at_most.push(f.negated());
                at_most.push(f);
            }
            AffineRelation::NonZero => {
                if f.coefs.iter().all(|&k| k == 0) {
                    // A constant: it removes everything or nothing.
                    if f.constant == 0 {
                        return Some(0);
                    }
                } else {
                    nonzero.push(f);
                }
            }
        }
    }
    if nonzero.len() > NONZERO_LIMIT {
        return None;
    }
    // Each subset below counts over the same dimensions or fewer: bound the whole work
    // before starting.
    let all: Vec<&Form> = at_most.iter().chain(&nonzero).collect();
    let mut involved: Vec<usize> = (0..dims)
        .filter(|&d| all.iter().any(|c| c.coefs[d] != 0))
        .collect();
    involved.sort_by_key(|&d| (std::cmp::Reverse(extents[d]), d));
    let mut work: u128 = 1 << nonzero.len();
    for &d in involved.iter().skip(2) {
        work = work.checked_mul(u128::from(extents[d]))?;
    }
    if work > ENUMERATION_LIMIT {
        return None;
    }
    // Points where no `!=` form is zero: inclusion and exclusion over the sets of forms
    // that are zero.
    let mut total: i128 = 0;
    for subset in 0u32..(1 << nonzero.len()) {
        let mut conds = at_most.clone();
        for (i, f) in nonzero.iter().enumerate() {
            if subset & (1 << i) != 0 {
                conds.push(f.negated());
                conds.push(f.clone());
            }
        }
        let n = i128::try_from(count_at_most(extents, &conds)?).ok()?;
        total = if subset.count_ones() % 2 == 0 {
            total.checked_add(n)?
        } else {
            total.checked_sub(n)?
        };
    }
    u128::try_from(total).ok()
}

/// `sum(coefs[d] * x[d]) + constant`, in 128-bit arithmetic.
#[derive(Clone, Debug)]
struct Form {
    coefs: Vec<i128>,
    constant: i128,
}

impl Form {
    fn negated(&self) -> Form {
        Form {
            coefs: self.coefs.iter().map(|&k| -k).collect(),
            constant: -self.constant,
        }
    }
}

/// Points of the box where every form is `<= 0`.
fn count_at_most(extents: &[u64], conditions: &[Form]) -> Option<u128> {
    let involved_in = |d: usize| conditions.iter().any(|c| c.coefs[d] != 0);
    let mut involved: Vec<usize> = (0..extents.len()).filter(|&d| involved_in(d)).collect();
    let mut free: u128 = 1;
    for d in (0..extents.len()).filter(|&d| !involved_in(d)) {
        free = free.checked_mul(u128::from(extents[d]))?;
    }
    // The two largest dimensions are solved; the rest are enumerated.
    involved.sort_by_key(|&d| (std::cmp::Reverse(extents[d]), d));
    let solved_y = involved.first().copied();
    let solved_x = involved.get(1).copied();
    let enumerated: Vec<usize> = involved.iter().skip(2).copied().collect();
    let mut points: u128 = 1;
    for &d in &enumerated {
        points = points.checked_mul(u128::from(extents[d]))?;
    }
    if points > ENUMERATION_LIMIT {
        return None;
    }
    let extent_of = |d: Option<usize>| d.map_or(1, |d| extents[d]);
    let (x_extent, y_extent) = (extent_of(solved_x), extent_of(solved_y));
    let coef_of = |c: &Form, d: Option<usize>| d.map_or(0, |d| c.coefs[d]);

    let mut values = vec![0i128; enumerated.len()];
    let mut lines: Vec<(i128, i128, i128)> = vec![(0, 0, 0); conditions.len()];
    let mut count: u128 = 0;
    loop {
        for (line, c) in lines.iter_mut().zip(conditions) {
            let mut constant = c.constant;
            for (&d, &v) in enumerated.iter().zip(&values) {
                constant = constant.checked_add(c.coefs[d].checked_mul(v)?)?;
            }
            *line = (coef_of(c, solved_y), coef_of(c, solved_x), constant);
        }
        count = count.checked_add(count_plane(x_extent, y_extent, &lines)?)?;

        // Odometer over the enumerated dimensions, last fastest.
        let mut k = enumerated.len();
        loop {
            if k == 0 {
                return count.checked_mul(free);
            }
            k -= 1;
            values[k] += 1;
            if values[k] < i128::from(extents[enumerated[k]]) {
                break;
            }
            values[k] = 0;
        }
    }
}

/// A bound on `y` as a function of `x`: `(slope * x + offset) / denominator`, with
/// `denominator > 0`. An upper bound is rounded down, a lower bound up.
#[derive(Clone, Copy, Debug)]
struct Line {
    slope: i128,
    offset: i128,
    denominator: i128,
}

impl Line {
    /// `(slope * x + offset)`, the numerator at `x`.
    fn numerator(&self, x: i128) -> Option<i128> {
        self.slope.checked_mul(x)?.checked_add(self.offset)
    }

    /// The sign of `self(x) - other(x)`, exactly.
    fn compare(&self, other: &Line, x: i128) -> Option<std::cmp::Ordering> {
        let a = self.numerator(x)?.checked_mul(other.denominator)?;
        let b = other.numerator(x)?.checked_mul(self.denominator)?;
        Some(a.cmp(&b))
    }

    /// The real `x` where the two lines meet, as `floor(x)`; `None` when parallel.
    fn crossing_floor(&self, other: &Line) -> Option<Option<i128>> {
        // slope_a x / den_a + off_a / den_a = slope_b x / den_b + off_b / den_b
        let den = match self
            .slope
            .checked_mul(other.denominator)
            .zip(other.slope.checked_mul(self.denominator))
        {
            Some((a, b)) => a.checked_sub(b),
            None => None,
        };
        let num = match other
            .offset
            .checked_mul(self.denominator)
            .zip(self.offset.checked_mul(other.denominator))
        {
            Some((a, b)) => a.checked_sub(b),
            None => None,
        };
        match (den, num) {
            (Some(0), Some(_)) => Some(None),
            (Some(den), Some(num)) => Some(Some(floor_div(num, den))),
            _ => None,
        }
    }

    /// `sum over x in [start, start + n) of floor(self(x))`.
    fn floor_sum(&self, start: i128, n: i128) -> Option<i128> {
        floor_sum(n, self.denominator, self.slope, self.numerator(start)?)
    }

    /// `sum over x in [start, start + n) of ceil(self(x))`.
    fn ceil_sum(&self, start: i128, n: i128) -> Option<i128> {
        floor_sum(
            n,
            self.denominator,
            self.slope.checked_neg()?,
            self.numerator(start)?.checked_neg()?,
        )?
        .checked_neg()
    }
}

/// Points `(x, y)` with `0 <= x < x_extent`, `0 <= y < y_extent` and
/// `a * y + b * x + c <= 0` for every `(a, b, c)`.
fn count_plane(x_extent: u64, y_extent: u64, conditions: &[(i128, i128, i128)]) -> Option<u128> {
    let (mut x_lo, mut x_hi) = (0i128, i128::from(x_extent) - 1);
    let mut upper = vec![Line {
        slope: 0,
        offset: i128::from(y_extent) - 1,
        denominator: 1,
    }];
    let mut lower = vec![Line {
        slope: 0,
        offset: 0,
        denominator: 1,
    }];
    for &(a, b, c) in conditions {
        if a == 0 {
            // A condition on x alone narrows its range.
            if b == 0 {
                if c > 0 {
                    return Some(0);
                }
            } else if b > 0 {
                x_hi = x_hi.min(floor_div(c.checked_neg()?, b));
            } else {
                x_lo = x_lo.max(ceil_div(c.checked_neg()?, b));
            }
        } else if a > 0 {
            // y <= (-b x - c) / a
            upper.push(Line {
                slope: b.checked_neg()?,
                offset: c.checked_neg()?,
                denominator: a,
            });
        } else {
            // y >= (b x + c) / -a
            lower.push(Line {
                slope: b,
                offset: c,
                denominator: a.checked_neg()?,
            });
        }
    }
    if x_lo > x_hi {
        return Some(0);
    }

    // Where any two bounds cross, the smallest upper or largest lower bound may change,
    // and so may the sign of their difference: cut [x_lo, x_hi] there.
    let mut cuts = vec![x_lo, x_hi + 1];
    let all: Vec<&Line> = upper.iter().chain(&lower).collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if let Some(f) = a.crossing_floor(b)? {
                for cut in [f, f.checked_add(1)?] {
                    if x_lo < cut && cut <= x_hi {
                        cuts.push(cut);
                    }
                }
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();

    // Inside a piece no two bounds cross, so the bounds that bind at its first x bind at
    // all of its x, and the count there is floor(upper) - ceil(lower) + 1 everywhere or
    // nowhere: floor(u) - ceil(l) + 1 >= 0 when u >= l, and <= 0 when u < l.
    let mut count: i128 = 0;
    for piece in cuts.windows(2) {
        let (start, n) = (piece[0], piece[1] - piece[0]);
        let mut up = upper[0];
        for l in &upper[1..] {
            if l.compare(&up, start)?.is_lt() {
                up = *l;
            }
        }
        let mut low = lower[0];
        for l in &lower[1..] {
            if l.compare(&low, start)?.is_gt() {
                low = *l;
            }
        }
        if up.compare(&low, start)?.is_lt() {
            continue;
        }
        let piece_count = up
            .floor_sum(start, n)?
            .checked_sub(low.ceil_sum(start, n)?)?
            .checked_add(n)?;
        count = count.checked_add(piece_count)?;
    }
    u128::try_from(count).ok()
}

/// `sum_{i=0}^{n-1} floor((a * i + b) / m)` for `n >= 0`, `m > 0`, in `O(log m)` steps.
fn floor_sum(n: i128, m: i128, a: i128, b: i128) -> Option<i128> {
    if n <= 0 {
        return Some(0);
    }
    // Reduce a and b to [0, m): floor((a i + b) / m) = floor(((a mod m) i + (b mod m)) / m)
    // + (a div m) i + (b div m).
    let (qa, ra) = (a.div_euclid(m), a.rem_euclid(m));
    let (qb, rb) = (b.div_euclid(m), b.rem_euclid(m));
    let mut total = qa
        .checked_mul(triangle(n)?)?
        .checked_add(qb.checked_mul(n)?)?;
    // The classic loop on non-negative values (AtCoder Library's floor_sum_unsigned).
    let (mut n, mut m, mut a, mut b) = (n, m, ra, rb);
    loop {
        if a >= m {
            total = total.checked_add((a / m).checked_mul(triangle(n)?)?)?;
            a %= m;
        }
        if b >= m {
            total = total.checked_add((b / m).checked_mul(n)?)?;
            b %= m;
        }
        let y_max = a.checked_mul(n)?.checked_add(b)?;
        if y_max < m {
            return Some(total);
        }
        n = y_max / m;
        b = y_max % m;
        std::mem::swap(&mut m, &mut a);
    }
}

/// `n (n - 1) / 2`.
fn triangle(n: i128) -> Option<i128> {
    if n % 2 == 0 {
        (n / 2).checked_mul(n - 1)
    } else {
        n.checked_mul((n - 1) / 2)
    }
}

fn floor_div(n: i128, d: i128) -> i128 {
    let q = n / d;
    if n % d != 0 && ((n < 0) != (d < 0)) {
        q - 1
    } else {
        q
    }
}

fn ceil_div(n: i128, d: i128) -> i128 {
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
            Some((n * (n + 1) / 2) as u128)
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
        assert_eq!(count_points(&[3, 4, 5], &[]), Some(60));
        assert_eq!(count_points(&[3, 0, 5], &[]), Some(0));
    }

    #[test]
    fn constant_false_condition_empties() {
        assert_eq!(count_points(&[3, 4], &[le(&[0, 0], 1)]), Some(0));
        assert_eq!(count_points(&[3, 4], &[le(&[0, 0], 0)]), Some(12));
    }
}
