//! FLOPs per Einsum and bytes per tensor.
//!
//! Points: an Einsum computes its expression at every point of its iteration space that
//! survives its mask. Absence propagates (language.md: "any map with an absent operand is
//! absent"), so an Einsum also skips the points where an input it reads point by point is
//! absent: the producer's mask is carried into the consumer's space through the access
//! indices. A reduction's result is present even when every point it reduced was absent
//! (it is the identity), so conditions over reduced ranks stop there. Masks are carried only
//! through outputs indexed by plain ranks; elsewhere the count is the (larger) own-mask count.
//!
//! Operation classes:
//! - *contraction*: a product of two tensor accesses, possibly times factors constant along
//!   the reduction, summed over a rank both operands carry: tensor-core work, 2 FLOPs per
//!   point. The constant factors (`scale`) are applied once per output point, where a real
//!   kernel applies them, and counted as scalar work there.
//! - *scalar*: every other map operator node is 1 FLOP per point; every reduction combine is
//!   1 FLOP per reduced point (an accumulator starts at the identity).
//! - *transcendental*: `exp`, `log`, `tanh`, `sqrt` nodes, counted in scalar FLOPs and again
//!   on their own for the special-function units.
//!
//! Costs are of the cascade as written: hoisting a map that is invariant along some rank
//! (`exp(-s[h] * I)` in a recurrence) is a schedule decision and is not assumed here.

use super::normalize::{LeafCascade, LeafCondition, LeafEinsum};
use super::points::{count_points, AffineCondition};
use einattn_ir::{BinaryOp, Expr, Handle, IndexExpr, Rank, ReduceOp, Tensor, UnaryOp};
use std::collections::HashMap;

/// What one Einsum costs.
#[derive(Clone, Debug, Default)]
pub(crate) struct EinsumCost {
    /// Points of the iteration space, ignoring masks.
    pub points_dense: u64,
    /// Points that survive the Einsum's own mask and the absence of its inputs.
    pub points: u64,
    /// Points of the output (reduced ranks projected away) that are present.
    pub output_points: u64,
    pub is_contraction: bool,
    /// The ranks the contraction sums over.
    pub contracted: Vec<Handle<Rank>>,
    pub contraction_flops: u64,
    pub scalar_flops: u64,
    pub transcendental_ops: u64,
    /// Map operator nodes applied per point (for a contraction: per output point).
    pub map_ops_per_point: u64,
    pub reduction_combines: u64,
    /// The conditions the count used, own and inherited, over leaf ranks.
    pub effective_mask: Vec<LeafCondition>,
    /// Whether some of those conditions come from inputs.
    pub inherits_mask: bool,
    /// Data-dependent masks the counts above do not see (own value conditions, and the
    /// tensors read point by point whose presence depends on values): the counts are
    /// upper bounds when this is not empty.
    pub data_dependent: Vec<String>,
}

impl EinsumCost {
    pub fn flops(&self) -> u64 {
        self.contraction_flops.saturating_add(self.scalar_flops)
    }
}

/// Counts cached by box and conditions: the Einsums of one cascade share masks (a causal
/// score is carried into the max, the exponential and the contraction with V).
#[derive(Default)]
pub(crate) struct PointCounter {
    cache: HashMap<(Vec<u64>, Vec<AffineCondition>), Option<u128>>,
    /// Masks that could not be counted exactly (their points are counted as the whole
    /// box), and counts past `u64::MAX`: reported as warnings, never silently.
    pub notes: Vec<String>,
}

impl PointCounter {
    /// Points of the box over `space` where every condition holds.
    pub fn count(
        &mut self,
        lc: &LeafCascade,
        space: &[Handle<Rank>],
        conds: &[LeafCondition],
    ) -> u64 {
        // Only the dimensions a condition mentions need counting; the rest multiply.
        // Sorted, so the same mask over the same ranks hits the cache whatever order the
        // Einsums list their ranks in.
        let mut involved: Vec<Handle<Rank>> = space
            .iter()
            .copied()
            .filter(|&r| conds.iter().any(|c| c.mentions(r)))
            .collect();
        involved.sort();
        let free: u128 = space
            .iter()
            .filter(|r| !involved.contains(r))
            .fold(1u128, |a, &r| a.saturating_mul(u128::from(lc.extent(r))));
        let extents: Vec<u64> = involved.iter().map(|&r| lc.extent(r)).collect();
        let affine: Vec<AffineCondition> = conds
            .iter()
            .map(|c| AffineCondition {
                coefs: involved
                    .iter()
                    .map(|&r| {
                        c.terms
                            .iter()
                            .filter(|&&(_, cr)| cr == r)
                            .map(|&(k, _)| k)
                            .sum()
                    })
                    .collect(),
                constant: c.constant,
                relation: c.relation,
            })
            .collect();
        let key = (extents, affine);
        let masked = match self.cache.get(&key) {
            Some(&n) => n,
            None => {
                let n = count_points(&key.0, &key.1);
                self.cache.insert(key.clone(), n);
                n
            }
        };
        let masked = masked.unwrap_or_else(|| {
            let names: Vec<&str> = involved.iter().map(|&r| lc.rank_name(r)).collect();
            self.note(format!(
                "the mask over ranks {} is too complex to count exactly at these sizes; its points are counted as the whole box (an upper bound)",
                names.join(", ")
            ));
            key.0.iter().fold(1u128, |a, &e| a.saturating_mul(u128::from(e)))
        });
        // Past u64::MAX the caller's dense count reports the overflow.
        saturate(masked.saturating_mul(free))
    }

    pub fn note(&mut self, message: String) {
        if !self.notes.contains(&message) {
            self.notes.push(message);
        }
    }
}

fn saturate(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Where a tensor's elements are present: conditions over the producer's output ranks
/// (one per dimension, in order), or `None` when every element is present or the producer's
/// output indices are not plain ranks (then nothing is carried, conservatively).
type Presence = Option<(Vec<Handle<Rank>>, Vec<LeafCondition>)>;

/// Costs every Einsum, in dependency order so inherited masks are known.
pub(crate) fn cost_einsums(lc: &LeafCascade, counter: &mut PointCounter) -> Vec<EinsumCost> {
    let mut costs = vec![EinsumCost::default(); lc.einsums.len()];
    // Per tensor: the conditions under which an element is present, as conditions over
    // dimension positions encoded as the tensor's own output ranks (the producer's plain
    // output ranks), or None when it is always present / not trackable.
    let mut presence: Vec<Presence> = vec![None; lc.cascade.tensors.len()];
    // Per tensor: the Einsum whose value conditions may make its elements absent.
    let mut data_dependent: Vec<Option<String>> = vec![None; lc.cascade.tensors.len()];

    for &h in &lc.order {
        let e = lc.einsum(h);
        let mut effective: Vec<LeafCondition> = e.mask.clone();
        let mut inherits = false;
        for a in e.accesses.iter().filter(|a| !a.self_read) {
            let Some((dims, conds)) = &presence[a.tensor.index()] else {
                continue;
            };
            if a.indices.len() != dims.len() {
                continue;
            }
            for c in conds {
                let moved = c.substitute(|r| {
                    dims.iter()
                        .position(|&d| d == r)
                        .map(|k| a.indices[k].clone())
                        .unwrap_or_else(|| IndexExpr::rank(r))
                });
                if !effective.contains(&moved) {
                    effective.push(moved);
                    inherits = true;
                }
            }
        }
        // Conditions outside the space (a malformed mask) cannot be counted; drop them.
        effective.retain(|c| c.ranks().all(|r| e.space.contains(&r)));

        let mut cost = cost_one(lc, e, &effective, inherits, counter);
        cost.data_dependent = e
            .value_mask
            .iter()
            .map(|m| format!("data-dependent mask `{m}`"))
            .collect();
        let mut inherited: Option<String> = None;
        for a in e.accesses.iter().filter(|a| !a.self_read) {
            if let Some(origin) = &data_dependent[a.tensor.index()] {
                let note = format!("{origin}'s data-dependent mask");
                if !cost.data_dependent.contains(&note) {
                    cost.data_dependent.push(note);
                }
                inherited.get_or_insert_with(|| origin.clone());
            }
        }
        // A reduction's result is present (the identity) wherever its own conditions over
        // output ranks hold, so only a map passes the absence on, or a value condition that
        // mentions no reduced rank.
        let own_outer = lc.cascade.einsums[h].value_mask.iter().any(|v| {
            !lc.cascade.einsums[h]
                .reductions
                .iter()
                .any(|r| v.mentions(r.rank))
        });
        data_dependent[e.output_tensor.index()] = if own_outer {
            Some(e.name.clone())
        } else if e.reductions.is_empty() {
            inherited
        } else {
            None
        };
        costs[h.index()] = cost;

        // What the output inherits: conditions over plain output ranks only. A map is
        // absent wherever an operand is, so it keeps everything; a reduction skips absent
        // operands and yields its identity (present), so it keeps only its own conditions
        // over output ranks (the interpreter's "outer conditions").
        let plain: Option<Vec<Handle<Rank>>> = e.output.iter().map(|i| i.as_rank()).collect();
        let carried: &[LeafCondition] = if e.reductions.is_empty() {
            &effective
        } else {
            &e.mask
        };
        presence[e.output_tensor.index()] = match plain {
            Some(dims) if e.recurrence_rank.is_none() => {
                let kept: Vec<LeafCondition> = carried
                    .iter()
                    .filter(|c| c.ranks().all(|r| dims.contains(&r)))
                    .cloned()
                    .collect();
                (!kept.is_empty()).then_some((dims, kept))
            }
            _ => None,
        };
    }
    costs
}

fn cost_one(
    lc: &LeafCascade,
    e: &LeafEinsum,
    effective: &[LeafCondition],
    inherits: bool,
    counter: &mut PointCounter,
) -> EinsumCost {
    let expr = &lc.cascade.einsums[e.handle].expr;
    let dense = e
        .space
        .iter()
        .fold(1u128, |a, &r| a.saturating_mul(u128::from(lc.extent(r))));
    if dense > u128::from(u64::MAX) {
        counter.note(format!(
            "`{}` iterates {} points, more than 2^64 - 1; counts, FLOPs and bytes derived from it are shown saturated at 18446744073709551615",
            e.name,
            if dense == u128::MAX { "at least 2^128 - 1".to_string() } else { dense.to_string() }
        ));
    }
    let points_dense = saturate(dense);
    let points = counter.count(lc, &e.space, effective);

    // Points of the space with the first `k` reductions projected away.
    let reduced_prefix = |k: usize| -> Vec<Handle<Rank>> {
        let removed: Vec<Handle<Rank>> = e.reductions[..k].iter().map(|&(r, _)| r).collect();
        e.space
            .iter()
            .copied()
            .filter(|r| !removed.contains(r))
            .collect()
    };
    let output_points =
        subspace_points(lc, &reduced_prefix(e.reductions.len()), effective, counter);

    let contraction = find_contraction(lc, e, expr);
    let mut cost = EinsumCost {
        points_dense,
        points,
        output_points,
        effective_mask: effective.to_vec(),
        inherits_mask: inherits,
        ..EinsumCost::default()
    };

    // Reductions the contraction does not cover are scalar combines at their level.
    let mut combines: u64 = 0;
    for (k, &(rank, _)) in e.reductions.iter().enumerate() {
        let covered = contraction
            .as_ref()
            .is_some_and(|c| c.summed.contains(&rank));
        if !covered {
            let level = if k == 0 {
                points
            } else {
                subspace_points(lc, &reduced_prefix(k), effective, counter)
            };
            combines = combines.saturating_add(level);
        }
    }
    cost.reduction_combines = combines;

    match contraction {
        Some(c) => {
            cost.is_contraction = true;
            cost.contraction_flops = points.saturating_mul(2);
            cost.map_ops_per_point = c.factor_ops;
            let mut scalar = c.factor_ops.saturating_mul(output_points);
            let mut trans = c.factor_transcendentals.saturating_mul(output_points);
            // Maps inside an operand (`P / L` in `P / L * V`) run once per point of the
            // operand's own ranks, before the product, as a fused kernel computes them.
            for map in &c.operand_maps {
                let n = subspace_points(lc, &map.ranks, effective, counter);
                scalar = scalar.saturating_add(map.ops.saturating_mul(n));
                trans = trans.saturating_add(map.transcendentals.saturating_mul(n));
            }
            cost.contracted = c.summed;
            cost.transcendental_ops = trans;
            cost.scalar_flops = scalar.saturating_add(combines);
        }
        None => {
            let (ops, trans) = count_ops(expr);
            cost.map_ops_per_point = ops;
            cost.transcendental_ops = trans.saturating_mul(points);
            cost.scalar_flops = ops.saturating_mul(points).saturating_add(combines);
        }
    }
    cost
}

/// (operator nodes, transcendental nodes) of an expression.
pub(crate) fn count_ops(expr: &Expr) -> (u64, u64) {
    match expr {
        Expr::Literal(_) | Expr::Access(_) | Expr::Index(_) => (0, 0),
        Expr::Unary(op, a) => {
            let (o, t) = count_ops(a);
            let is_sfu = matches!(
                op,
                UnaryOp::Exp | UnaryOp::Log | UnaryOp::Tanh | UnaryOp::Sqrt
            );
            (o + 1, t + u64::from(is_sfu))
        }
        Expr::Binary(_, a, b) => {
            let (oa, ta) = count_ops(a);
            let (ob, tb) = count_ops(b);
            (oa + ob + 1, ta + tb)
        }
    }
}

struct Contraction {
    summed: Vec<Handle<Rank>>,
    /// Operator nodes outside the one product the tensor cores do, applied per output
    /// point: the multiplications by constant factors and the factors' own operators.
    factor_ops: u64,
    factor_transcendentals: u64,
    /// Maps inside the two operands, applied per point of each operand's ranks.
    operand_maps: Vec<OperandMap>,
}

struct OperandMap {
    ranks: Vec<Handle<Rank>>,
    ops: u64,
    transcendentals: u64,
}

/// Recognizes `c1 * ... * X * ... * Y` summed over ranks both operands `X` and `Y` carry,
/// where every other factor `c` is constant along the summed ranks and some rank is carried
/// by one operand only (a matrix-vector or matrix-matrix shape). A product of two operands
/// over the same ranks is a batched dot product: no tensor-core shape, scalar work.
fn find_contraction(lc: &LeafCascade, e: &LeafEinsum, expr: &Expr) -> Option<Contraction> {
    let summed_all: Vec<Handle<Rank>> = e
        .reductions
        .iter()
        .filter(|&&(_, op)| op == ReduceOp::Sum)
        .map(|&(r, _)| r)
        .collect();
    if summed_all.is_empty() || e.recurrence_rank.is_some() {
        return None;
    }
    let mut factors = Vec::new();
    flatten_product(expr, &mut factors);
    if factors.len() < 2 {
        return None;
    }
    let ranks_of = |f: &Expr| -> Vec<Handle<Rank>> {
        let mut ranks: Vec<Handle<Rank>> = Vec::new();
        f.visit_indices(&mut |i| {
            for r in super::normalize::expand_index(lc.cascade, i).ranks() {
                if !ranks.contains(&r) {
                    ranks.push(r);
                }
            }
        });
        ranks
    };
    let (operands, constants): (Vec<&Expr>, Vec<&Expr>) = factors
        .iter()
        .partition(|f| ranks_of(f).iter().any(|r| summed_all.contains(r)));
    // Two operands carry the product; a further factor over the summed ranks whose ranks
    // all belong to one of them (a decay `exp(c (i - j))` next to a score over (i, j)) is
    // applied to that operand before the product, as a kernel scales a tile before the
    // MMA. The pair tried first is the one spanning the most ranks.
    let operand_ranks: Vec<Vec<Handle<Rank>>> = operands.iter().map(|f| ranks_of(f)).collect();
    let subset = |a: &[Handle<Rank>], b: &[Handle<Rank>]| a.iter().all(|r| b.contains(r));
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for i in 0..operands.len() {
        for j in i + 1..operands.len() {
            pairs.push((i, j));
        }
    }
    pairs.sort_by_key(|&(i, j)| std::cmp::Reverse(operand_ranks[i].len() + operand_ranks[j].len()));
    let (a, b, groups) = pairs.into_iter().find_map(|(i, j)| {
        let mut groups: Vec<usize> = vec![usize::MAX; operands.len()];
        groups[i] = 0;
        groups[j] = 1;
        for k in 0..operands.len() {
            if k == i || k == j {
                continue;
            }
            groups[k] = if subset(&operand_ranks[k], &operand_ranks[i]) {
                0
            } else if subset(&operand_ranks[k], &operand_ranks[j]) {
                1
            } else {
                return None;
            };
        }
        Some((i, j, groups))
    })?;
    let (ra, rb) = (operand_ranks[a].clone(), operand_ranks[b].clone());
    let summed: Vec<Handle<Rank>> = summed_all
        .iter()
        .copied()
        .filter(|r| ra.contains(r) && rb.contains(r))
        .collect();
    // A summed rank only one operand carries would make this a scaled sum, not one
    // product the tensor cores run.
    if summed.is_empty() || summed.len() != summed_all.len() {
        return None;
    }
    let has_free_rank = ra.iter().any(|r| !rb.contains(r)) || rb.iter().any(|r| !ra.contains(r));
    if !has_free_rank {
        return None;
    }
    let (mut factor_ops, mut factor_transcendentals) = (0u64, 0u64);
    for c in &constants {
        let (o, t) = count_ops(c);
        factor_ops += o;
        factor_transcendentals += t;
    }
    // n factors are joined by n - 1 multiplications; one of them is the contraction's, and
    // those joining a factor to its operand are the operand's.
    let merged = operands.len() as u64 - 2;
    factor_ops += factors.len() as u64 - 2 - merged;
    let operand_maps = [(0usize, ra), (1usize, rb)]
        .into_iter()
        .filter_map(|(group, ranks)| {
            let (mut ops, mut transcendentals) = (0u64, 0u64);
            for (k, f) in operands.iter().enumerate() {
                if groups[k] != group {
                    continue;
                }
                let (o, t) = count_ops(f);
                ops += o;
                transcendentals += t;
                if k != a && k != b {
                    // The multiplication that applies it to its operand.
                    ops += 1;
                }
            }
            (ops > 0).then_some(OperandMap {
                ranks,
                ops,
                transcendentals,
            })
        })
        .collect();
    Some(Contraction {
        summed,
        factor_ops,
        factor_transcendentals,
        operand_maps,
    })
}

/// Points of the sub-box over `ranks` where the conditions that mention only those ranks
/// hold.
fn subspace_points(
    lc: &LeafCascade,
    ranks: &[Handle<Rank>],
    conditions: &[LeafCondition],
    counter: &mut PointCounter,
) -> u64 {
    let kept: Vec<LeafCondition> = conditions
        .iter()
        .filter(|c| c.ranks().all(|r| ranks.contains(&r)))
        .cloned()
        .collect();
    counter.count(lc, ranks, &kept)
}

fn flatten_product<'e>(expr: &'e Expr, out: &mut Vec<&'e Expr>) {
    match expr {
        Expr::Binary(BinaryOp::Mul, a, b) => {
            flatten_product(a, out);
            flatten_product(b, out);
        }
        other => out.push(other),
    }
}

/// Bytes of one tensor in memory: its elements times its storage type (f32 when a
/// parameter or output declares none).
pub(crate) fn tensor_bytes(lc: &LeafCascade, tensor: Handle<Tensor>) -> u64 {
    let t = &lc.cascade.tensors[tensor];
    let width = t.dtype.map(|d| d.bytes()).unwrap_or(4);
    lc.cascade.tensor_elements(tensor).saturating_mul(width)
}
