//! Splitting a rank into an outer rank and a tile rank (`m = m1 * M0 + m0`) throughout a
//! cascade. A pure re-indexing: every reduction over the rank becomes a reduction over
//! the tile rank nested in one over the outer rank (all reduction operators are
//! associative and commutative), temporaries with the rank get two dimensions, and
//! inputs and outputs keep theirs, read and written at the combined index.

use super::ir_util::{fresh_rank_name, substitute_index};
use einattn_ir::{
    Access, Cascade, Condition, Expr, ExtentSource, Handle, IndexExpr, Rank, Reduction, Split,
    TensorKind, ValueCondition,
};
use std::collections::HashMap;

/// Why a rank cannot be split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SplitError {
    AlreadySplit,
    Iterative,
    TileDoesNotDivide {
        extent: u64,
        tile: u64,
    },
    /// A temporary's dimension over the rank is read at something other than the rank.
    IrregularAccess(String),
}

/// The largest divisor of `extent` not above `wanted` (at least 1).
pub fn tile_dividing(extent: u64, wanted: u64) -> u64 {
    (1..=wanted.clamp(1, extent.max(1)))
        .rev()
        .find(|t| extent.is_multiple_of(*t))
        .unwrap_or(1)
}

/// Splits `rank` into `(outer, tile)` with a tile of `tile` points. Returns the two new
/// ranks.
pub fn split_rank(
    cascade: &mut Cascade,
    rank: Handle<Rank>,
    tile: u64,
) -> Result<(Handle<Rank>, Handle<Rank>), SplitError> {
    let r = &cascade.ranks[rank];
    if r.split.is_some() || r.parent.is_some() {
        return Err(SplitError::AlreadySplit);
    }
    if tile == 0 || !r.extent.is_multiple_of(tile) {
        return Err(SplitError::TileDoesNotDivide {
            extent: r.extent,
            tile,
        });
    }
    if cascade
        .einsums
        .iter()
        .any(|(_, e)| e.recurrence.as_ref().is_some_and(|rec| rec.rank == rank))
    {
        return Err(SplitError::Iterative);
    }
    // Temporaries whose dimensions over `rank` become two dimensions.
    let split_dims: Vec<Vec<usize>> = cascade
        .tensors
        .iter()
        .map(|(_, t)| {
            if t.kind != TensorKind::Temp {
                return Vec::new();
            }
            t.ranks
                .iter()
                .enumerate()
                .filter(|(_, &q)| q == rank)
                .map(|(d, _)| d)
                .collect()
        })
        .collect();
    let plain = IndexExpr::rank(rank);
    for (_, e) in cascade.einsums.iter() {
        let mut ok = true;
        let mut check = |a: &Access| {
            for &d in &split_dims[a.tensor.index()] {
                ok &= a.indices.get(d) == Some(&plain);
            }
        };
        check(&e.output);
        e.visit_reads(&mut check);
        if !ok {
            return Err(SplitError::IrregularAccess(
                cascade.tensors[e.output.tensor].name.clone(),
            ));
        }
    }

    let name = r.name.clone();
    let extent = r.extent;
    let outer_name = fresh_rank_name(cascade, &format!("{name}1"));
    let outer = cascade.ranks.append(Rank {
        name: outer_name,
        extent: extent / tile,
        source: ExtentSource::SplitOuter,
        split: None,
        parent: Some(rank),
        span: Default::default(),
    });
    let inner_name = fresh_rank_name(cascade, &format!("{name}0"));
    let inner = cascade.ranks.append(Rank {
        name: inner_name,
        extent: tile,
        source: ExtentSource::SplitTile,
        split: None,
        parent: Some(rank),
        span: Default::default(),
    });
    cascade.ranks[rank].split = Some(Split { outer, inner });

    // Outer term first: the form the printer recognizes as the split parent.
    let combined = IndexExpr {
        terms: vec![(tile as i64, outer), (1, inner)],
        constant: 0,
    };
    let rename: HashMap<Handle<Rank>, IndexExpr> = [(rank, combined)].into_iter().collect();
    let fix_access = |a: &Access| -> Access {
        let dims = &split_dims[a.tensor.index()];
        let mut indices = Vec::with_capacity(a.indices.len() + dims.len());
        for (d, i) in a.indices.iter().enumerate() {
            if dims.contains(&d) {
                indices.push(IndexExpr::rank(outer));
                indices.push(IndexExpr::rank(inner));
            } else {
                indices.push(substitute_index(i, &rename));
            }
        }
        Access {
            tensor: a.tensor,
            indices,
            span: a.span,
        }
    };
    let fix_expr =
        |e: &Expr| super::ir_util::map_accesses(e, &mut |a| Expr::Access(fix_access(a)), &rename);
    let handles: Vec<_> = cascade.einsums.handles().collect();
    for h in handles {
        let e = &cascade.einsums[h];
        let output = fix_access(&e.output);
        let expr = fix_expr(&e.expr);
        let mask: Vec<Condition> = e
            .mask
            .iter()
            .map(|c| Condition {
                lhs: substitute_index(&c.lhs, &rename),
                op: c.op,
                rhs: substitute_index(&c.rhs, &rename),
                span: c.span,
            })
            .collect();
        let mut reductions = Vec::with_capacity(e.reductions.len() + 1);
        for red in &e.reductions {
            if red.rank == rank {
                reductions.push(Reduction {
                    rank: inner,
                    op: red.op,
                });
                reductions.push(Reduction {
                    rank: outer,
                    op: red.op,
                });
            } else {
                reductions.push(red.clone());
            }
        }
        let init = e.recurrence.as_ref().map(|rec| fix_expr(&rec.init));
        let value_mask: Vec<ValueCondition> = e
            .value_mask
            .iter()
            .map(|v| ValueCondition {
                lhs: fix_expr(&v.lhs),
                op: v.op,
                rhs: fix_expr(&v.rhs),
                span: v.span,
            })
            .collect();
        let e = &mut cascade.einsums[h];
        e.output = output;
        e.expr = expr;
        e.mask = mask;
        e.value_mask = value_mask;
        e.reductions = reductions;
        if let (Some(rec), Some(init)) = (e.recurrence.as_mut(), init) {
            rec.init = init;
        }
    }
    for (t, dims) in split_dims.iter().enumerate() {
        if dims.is_empty() {
            continue;
        }
        let tensor = &mut cascade.tensors[Handle::new(t)];
        let mut ranks = Vec::with_capacity(tensor.ranks.len() + dims.len());
        let mut iterative = tensor.iterative;
        for (d, &q) in tensor.ranks.iter().enumerate() {
            if dims.contains(&d) {
                ranks.push(outer);
                ranks.push(inner);
                if let Some(it) = iterative.as_mut() {
                    if *it > d {
                        *it += 1;
                    }
                }
            } else {
                ranks.push(q);
            }
        }
        tensor.ranks = ranks;
        tensor.iterative = iterative;
    }
    Ok((outer, inner))
}
