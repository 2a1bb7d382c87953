//! Reductions normalized by a max: `G = max_r X` and sums `U = sum_r exp(X - G) * W`
//! (softmax's denominator and numerator, a log-sum-exp, a softmax-weighted mean).
//!
//! The algebra that makes them streamable is `exp(x - a) = exp(x - b) * exp(b - a)`: a sum
//! taken against a provisional maximum `b` is corrected to the true one by one factor.
//! Two rewrites use it, after the rank is split into `(r1, r0)`:
//! - [`online`]: a running maximum and rescaled running sums along `r1` (one pass over
//!   `r1`; FlashAttention-2's forward, FuseMax's 1-pass cascade);
//! - [`split_k`]: each `r1` slice reduced on its own, then merged by log-sum-exp over `r1`
//!   (flash-decoding: parallel over key splits when there are few queries).
//!
//! Nothing here knows about attention: any max-normalized sum of exponentials matches.

use super::ir_util::{self, factors, fresh_name, inline_maps, product, reads, same_expr};
use einattn_ir::{
    Access, BinaryOp, Cascade, Condition, Einsum, Expr, ExtentSource, Handle, IndexExpr, Rank,
    Recurrence, ReduceOp, Reduction, Span, Tensor, TensorKind, UnaryOp,
};
use std::collections::HashMap;

/// Where masks or absent reads may leave a maximum at `-inf`: the online form starts its
/// running max at LOW, and split-K's merge uses `max(m, LOW)` instead of `m`, so
/// `exp(-inf - (-inf))` never appears. Finite in f32 and bf16, below any score that
/// matters (a score below it would count as absent).
const LOW: f64 = -1e38;

/// One max reduction and the sums it normalizes, found on a split rank.
#[derive(Clone, Debug)]
pub struct NormalizedGroup {
    /// The max Einsum and its operand.
    pub max_einsum: Handle<Einsum>,
    pub operand: Expr,
    pub outer: Handle<Rank>,
    pub tile: Handle<Rank>,
    pub sums: Vec<NormalizedSum>,
    /// Whether some point may be absent (masks), which calls for the clamped rescaling.
    pub maskable: bool,
}

#[derive(Clone, Debug)]
pub struct NormalizedSum {
    pub einsum: Handle<Einsum>,
    /// `X` as the sum reads it (its ranks).
    pub operand: Expr,
    /// The read of `G` inside `exp(X - G)`.
    pub max_read: Access,
    /// The other factors (`1` when there are none).
    pub weight: Expr,
    /// The sum's mask, with the masks of the map temporaries its view inlined.
    pub mask: Vec<Condition>,
}

fn reduces_exactly(e: &Einsum, tile: Handle<Rank>, outer: Handle<Rank>, op: ReduceOp) -> bool {
    matches!(e.reductions.as_slice(),
        [a, b] if a.rank == tile && b.rank == outer && a.op == op && b.op == op)
}

/// The split ranks `(outer, tile)` of `rank`'s children, if it was split.
fn children(cascade: &Cascade, rank: Handle<Rank>) -> Option<(Handle<Rank>, Handle<Rank>)> {
    cascade.ranks[rank]
        .split
        .as_ref()
        .map(|s| (s.outer, s.inner))
}

/// Finds the max-normalized group over the split of `rank`, if there is one.
pub fn find_group(cascade: &Cascade, rank: Handle<Rank>) -> Option<NormalizedGroup> {
    let (outer, tile) = children(cascade, rank)?;
    let absent =
        ir_util::tensors_may_be_absent(cascade, &einattn_ir::validate::topological_order(cascade));
    for (g, ge) in cascade.einsums.iter() {
        if ge.recurrence.is_some()
            || !ge.value_mask.is_empty()
            || !reduces_exactly(ge, tile, outer, ReduceOp::Max)
            || !ge.output.indices.iter().all(|i| i.as_rank().is_some())
        {
            continue;
        }
        let g_tensor = ge.output.tensor;
        // Seen through map temporaries, masked ones included, as the sums are seen (their
        // conditions reach the sums' masks; the max's absent points are skipped anyway).
        let x_view = view_with_masks(cascade, &ge.expr, &mut Vec::new());
        let mut sums = Vec::new();
        for (u, ue) in cascade.einsums.iter() {
            if u == g
                || ue.recurrence.is_some()
                || !ue.value_mask.is_empty()
                || !reduces_exactly(ue, tile, outer, ReduceOp::Sum)
            {
                continue;
            }
            if let Some(s) = match_sum(cascade, u, ue, ge, &x_view) {
                sums.push(s);
            }
        }
        if sums.is_empty() {
            continue;
        }
        // A weight may not read the maximum or another sum of the group.
        let members: Vec<Handle<Tensor>> = std::iter::once(g_tensor)
            .chain(sums.iter().map(|s| cascade.einsums[s.einsum].output.tensor))
            .collect();
        if sums.iter().any(|s| {
            members
                .iter()
                .any(|&t| reads(&s.weight, t) || reads(&s.operand, t))
        }) {
            continue;
        }
        // A condition over neither split rank would make whole rows absent, and the
        // recurrences cannot carry an absent state.
        let on_split = |c: &Condition| {
            [&c.lhs, &c.rhs]
                .iter()
                .any(|x| x.mentions(tile) || x.mentions(outer))
        };
        if !ge.mask.iter().all(on_split) || !sums.iter().all(|s| s.mask.iter().all(on_split)) {
            continue;
        }
        let mut maskable = !ge.mask.is_empty() || sums.iter().any(|s| !s.mask.is_empty());
        ge.expr
            .visit_accesses(&mut |a| maskable |= absent[a.tensor.index()]);
        for s in &sums {
            s.weight
                .visit_accesses(&mut |a| maskable |= absent[a.tensor.index()]);
        }
        return Some(NormalizedGroup {
            max_einsum: g,
            operand: ge.expr.clone(),
            outer,
            tile,
            sums,
            maskable,
        });
    }
    None
}

/// Masked map temporaries inlined into a view carry their conditions along.
fn view_with_masks(cascade: &Cascade, expr: &Expr, mask: &mut Vec<Condition>) -> Expr {
    fn go(cascade: &Cascade, expr: &Expr, mask: &mut Vec<Condition>, depth: usize) -> Expr {
        ir_util::map_accesses(
            expr,
            &mut |a| {
                let t = &cascade.tensors[a.tensor];
                let producer = cascade.producer(a.tensor).map(|e| &cascade.einsums[e]);
                match producer {
                    Some(e)
                        if depth < 64
                            && t.kind == TensorKind::Temp
                            && e.reductions.is_empty()
                            && e.value_mask.is_empty()
                            && e.recurrence.is_none() =>
                    {
                        let mut rename = HashMap::new();
                        for (o, i) in e.output.indices.iter().zip(&a.indices) {
                            match o.as_rank() {
                                Some(r) => rename.insert(r, i.clone()),
                                None => return Expr::Access(a.clone()),
                            };
                        }
                        for c in &e.mask {
                            mask.push(Condition {
                                lhs: ir_util::substitute_index(&c.lhs, &rename),
                                op: c.op,
                                rhs: ir_util::substitute_index(&c.rhs, &rename),
                                span: c.span,
                            });
                        }
                        let def = ir_util::substitute_expr(&e.expr, &rename);
                        go(cascade, &def, mask, depth + 1)
                    }
                    _ => Expr::Access(a.clone()),
                }
            },
            &HashMap::new(),
        )
    }
    go(cascade, expr, mask, 0)
}

fn match_sum(
    cascade: &Cascade,
    u: Handle<Einsum>,
    ue: &Einsum,
    ge: &Einsum,
    x_view: &Expr,
) -> Option<NormalizedSum> {
    // Conditions inlined from map temporaries make points absent; under sums only, an
    // absent point and a skipped one are the same.
    let mut mask = ue.mask.clone();
    let view = view_with_masks(cascade, &ue.expr, &mut mask);
    let mut fs = factors(&view);
    let position = fs.iter().position(|f| {
        let Expr::Unary(UnaryOp::Exp, arg) = f else {
            return false;
        };
        let Expr::Binary(BinaryOp::Sub, _, b) = arg.as_ref() else {
            return false;
        };
        matches!(b.as_ref(), Expr::Access(a) if a.tensor == ge.output.tensor)
    })?;
    let Expr::Unary(_, arg) = fs.remove(position) else {
        return None;
    };
    let Expr::Binary(_, operand, max_read) = *arg else {
        return None;
    };
    let Expr::Access(max_read) = *max_read else {
        return None;
    };
    // `X` renamed from the max Einsum's ranks to where the sum reads the max.
    let mut rename = HashMap::new();
    for (o, i) in ge.output.indices.iter().zip(&max_read.indices) {
        rename.insert(o.as_rank()?, i.clone());
    }
    let expected = ir_util::substitute_expr(x_view, &rename);
    if !same_expr(&inline_maps(cascade, &operand), &expected) {
        return None;
    }
    let split = |r: Handle<Rank>| ge.reductions.iter().any(|red| red.rank == r);
    if max_read.indices.iter().any(|i| i.ranks().any(split)) {
        return None;
    }
    // The operand as the max Einsum reads it (`S`, materialized once) rather than as the
    // sum's view spells it out (`cap * tanh(QK)`): equal values, but the view would
    // recompute every map of it in the exponential.
    let operand = ir_util::substitute_expr(&ge.expr, &rename);
    Some(NormalizedSum {
        einsum: u,
        operand,
        max_read,
        weight: product(fs),
        mask,
    })
}

fn access(tensor: Handle<Tensor>, indices: Vec<IndexExpr>) -> Access {
    Access {
        tensor,
        indices,
        span: Span::UNKNOWN,
    }
}

fn ranks_of(indices: &[IndexExpr]) -> Vec<IndexExpr> {
    indices.to_vec()
}

fn temp(
    cascade: &mut Cascade,
    name: &str,
    ranks: Vec<Handle<Rank>>,
    iterative: Option<usize>,
) -> Handle<Tensor> {
    let name = fresh_name(cascade, name);
    cascade.tensors.append(Tensor {
        name,
        ranks,
        kind: TensorKind::Temp,
        dtype: None,
        iterative,
        default: None,
        span: Span::UNKNOWN,
    })
}

fn exp(e: Expr) -> Expr {
    Expr::unary(UnaryOp::Exp, e)
}

fn sub(a: Expr, b: Expr) -> Expr {
    Expr::binary(BinaryOp::Sub, a, b)
}

fn clamp(e: Expr, maskable: bool) -> Expr {
    if maskable {
        Expr::binary(BinaryOp::Max, e, Expr::Literal(LOW))
    } else {
        e
    }
}

/// The output ranks of an Einsum (its output access must be plain ranks).
fn output_ranks(e: &Einsum) -> Vec<Handle<Rank>> {
    e.output
        .indices
        .iter()
        .filter_map(IndexExpr::as_rank)
        .collect()
}

fn with_rank(index: &[IndexExpr], first: IndexExpr) -> Vec<IndexExpr> {
    std::iter::once(first)
        .chain(index.iter().cloned())
        .collect()
}

/// Replaces every read of `from` (outside `skip`) with a read of `to` at the same indices
/// plus a leading `step` index.
fn redirect(cascade: &mut Cascade, from: Handle<Tensor>, to: Handle<Tensor>, step: i64) {
    let handles: Vec<_> = cascade.einsums.handles().collect();
    for h in handles {
        let e = &cascade.einsums[h];
        if !reads(&e.expr, from) {
            continue;
        }
        let expr = ir_util::map_accesses(
            &e.expr,
            &mut |a| {
                if a.tensor == from {
                    Expr::Access(access(to, with_rank(&a.indices, IndexExpr::constant(step))))
                } else {
                    Expr::Access(a.clone())
                }
            },
            &HashMap::new(),
        );
        cascade.einsums[h].expr = expr;
    }
}

/// Removes the Einsum producing `tensor` if it is a temporary; an output keeps an Einsum
/// that copies `replacement` into it.
fn retire(cascade: &mut Cascade, einsum: Handle<Einsum>, replacement: Expr) {
    let e = &mut cascade.einsums[einsum];
    e.expr = replacement;
    e.reductions.clear();
    e.mask.clear();
}

/// The 1-pass form: running max `RM` and rescaled running sums along the outer rank.
pub fn online(cascade: &Cascade, group: &NormalizedGroup) -> Cascade {
    let mut c = cascade.clone();
    let (outer, tile) = (group.outer, group.tile);
    let steps = c.ranks[outer].extent as i64;
    let ge = c.einsums[group.max_einsum].clone();
    let g_name = c.tensors[ge.output.tensor].name.clone();
    let f_g = output_ranks(&ge);
    let g_out: Vec<IndexExpr> = ranks_of(&ge.output.indices);
    let step = IndexExpr::rank(outer);
    let mut next = IndexExpr::rank(outer);
    next.constant = 1;

    let tile_max = temp(
        &mut c,
        &format!("{g_name}_tile"),
        with_ranks(outer, &f_g),
        None,
    );
    let running_max = temp(
        &mut c,
        &format!("{g_name}_run"),
        with_ranks(outer, &f_g),
        Some(0),
    );
    let rescale = temp(
        &mut c,
        &format!("{g_name}_rescale"),
        with_ranks(outer, &f_g),
        None,
    );
    let mut added = vec![
        Einsum {
            output: access(tile_max, with_rank(&g_out, step.clone())),
            expr: group.operand.clone(),
            reductions: vec![Reduction {
                rank: tile,
                op: ReduceOp::Max,
            }],
            mask: ge.mask.clone(),
            value_mask: Vec::new(),
            recurrence: None,
            span: ge.span,
        },
        Einsum {
            output: access(running_max, with_rank(&g_out, next.clone())),
            expr: Expr::binary(
                BinaryOp::Max,
                Expr::Access(access(running_max, with_rank(&g_out, step.clone()))),
                Expr::Access(access(tile_max, with_rank(&g_out, step.clone()))),
            ),
            reductions: vec![],
            mask: vec![],
            value_mask: Vec::new(),
            // Where a whole tile may be absent (masks), the running max starts at the
            // finite LOW rather than -inf: a step that has seen nothing then rescales by
            // exp(LOW - LOW) = 1 (its sums are 0) instead of exp(-inf - -inf) = NaN, with
            // no clamp in the rescale (which the kernel recognizer reads as is).
            recurrence: Some(Recurrence {
                rank: outer,
                init: Expr::Literal(if group.maskable {
                    LOW
                } else {
                    f64::NEG_INFINITY
                }),
                init_span: Span::UNKNOWN,
                reverse: false,
            }),
            span: Span::UNKNOWN,
        },
        Einsum {
            output: access(rescale, with_rank(&g_out, step.clone())),
            expr: exp(sub(
                Expr::Access(access(running_max, with_rank(&g_out, step.clone()))),
                Expr::Access(access(running_max, with_rank(&g_out, next.clone()))),
            )),
            reductions: vec![],
            mask: vec![],
            value_mask: Vec::new(),
            recurrence: None,
            span: Span::UNKNOWN,
        },
    ];
    // Sums that exponentiate the same operand against the same maximum share one
    // Einsum for it (softmax's numerator feeds both the denominator and the contraction).
    let shared_exp = shared_exponential(&mut c, group, &g_name, &next, running_max, &mut added);
    for s in &group.sums {
        let ue = c.einsums[s.einsum].clone();
        let u_name = c.tensors[ue.output.tensor].name.clone();
        let f_u = output_ranks(&ue);
        let u_out = ranks_of(&ue.output.indices);
        let tile_sum = temp(
            &mut c,
            &format!("{u_name}_tile"),
            with_ranks(outer, &f_u),
            None,
        );
        let running = temp(
            &mut c,
            &format!("{u_name}_run"),
            with_ranks(outer, &f_u),
            Some(0),
        );
        let max_next = access(running_max, with_rank(&s.max_read.indices, next.clone()));
        let max_step = with_rank(&s.max_read.indices, step.clone());
        let exponential = match &shared_exp {
            Some(read) => read.clone(),
            None => exp(sub(s.operand.clone(), Expr::Access(max_next))),
        };
        added.push(Einsum {
            output: access(tile_sum, with_rank(&u_out, step.clone())),
            expr: times(exponential, s.weight.clone()),
            reductions: vec![Reduction {
                rank: tile,
                op: ReduceOp::Sum,
            }],
            mask: s.mask.clone(),
            value_mask: Vec::new(),
            recurrence: None,
            span: ue.span,
        });
        added.push(Einsum {
            output: access(running, with_rank(&u_out, next.clone())),
            expr: Expr::binary(
                BinaryOp::Add,
                Expr::Access(access(tile_sum, with_rank(&u_out, step.clone()))),
                Expr::binary(
                    BinaryOp::Mul,
                    Expr::Access(access(running, with_rank(&u_out, step.clone()))),
                    Expr::Access(access(rescale, max_step)),
                ),
            ),
            reductions: vec![],
            mask: vec![],
            value_mask: Vec::new(),
            recurrence: Some(Recurrence {
                rank: outer,
                init: Expr::Literal(0.0),
                init_span: Span::UNKNOWN,
                reverse: false,
            }),
            span: Span::UNKNOWN,
        });
        let u_tensor = ue.output.tensor;
        redirect(&mut c, u_tensor, running, steps);
        retire(
            &mut c,
            s.einsum,
            Expr::Access(access(
                running,
                with_rank(&u_out, IndexExpr::constant(steps)),
            )),
        );
    }
    let g_tensor = ge.output.tensor;
    if group.maskable {
        // The running max of a row with no present point ends at LOW, not -inf; readers
        // of the maximum itself get the exact value: the max of the tile maxima.
        c.einsums[group.max_einsum] = Einsum {
            output: ge.output.clone(),
            expr: Expr::Access(access(tile_max, with_rank(&g_out, step.clone()))),
            reductions: vec![Reduction {
                rank: outer,
                op: ReduceOp::Max,
            }],
            mask: vec![],
            value_mask: Vec::new(),
            recurrence: None,
            span: ge.span,
        };
    } else {
        redirect(&mut c, g_tensor, running_max, steps);
        retire(
            &mut c,
            group.max_einsum,
            Expr::Access(access(
                running_max,
                with_rank(&g_out, IndexExpr::constant(steps)),
            )),
        );
    }
    for e in added {
        c.einsums.append(e);
    }
    ir_util::tidy(&mut c);
    c
}

/// `a * w`, or `a` when the weight is the literal 1.
fn times(a: Expr, w: Expr) -> Expr {
    match w {
        Expr::Literal(1.0) => a,
        w => Expr::binary(BinaryOp::Mul, a, w),
    }
}

/// When every sum reads the same `exp(X - G)` with plain ranks, one Einsum computes it
/// against the running maximum; returns the read of it.
fn shared_exponential(
    c: &mut Cascade,
    group: &NormalizedGroup,
    g_name: &str,
    next: &IndexExpr,
    running_max: Handle<Tensor>,
    added: &mut Vec<Einsum>,
) -> Option<Expr> {
    let first = group.sums.first()?;
    let same = group.sums.iter().all(|s| {
        same_expr(&s.operand, &first.operand) && s.max_read.indices == first.max_read.indices
    });
    if group.sums.len() < 2 || !same {
        return None;
    }
    // Absent operands stay absent in the stored exponential, and each sum keeps its mask.
    let expr = exp(sub(
        first.operand.clone(),
        Expr::Access(access(
            running_max,
            with_rank(&first.max_read.indices, next.clone()),
        )),
    ));
    let mut ranks = ir_util::expr_ranks(&expr);
    ranks.sort();
    let tensor = temp(c, &format!("{g_name}_exp"), ranks.clone(), None);
    let read = access(tensor, ranks.iter().map(|&r| IndexExpr::rank(r)).collect());
    added.push(Einsum {
        output: read.clone(),
        expr,
        reductions: vec![],
        mask: vec![],
        value_mask: Vec::new(),
        recurrence: None,
        span: Span::UNKNOWN,
    });
    Some(Expr::Access(read))
}

fn with_ranks(first: Handle<Rank>, rest: &[Handle<Rank>]) -> Vec<Handle<Rank>> {
    std::iter::once(first).chain(rest.iter().copied()).collect()
}

/// The flash-decoding form: each outer slice reduced on its own (parallel over slices),
/// then one log-sum-exp merge over the outer rank.
pub fn split_k(cascade: &Cascade, group: &NormalizedGroup) -> Cascade {
    let mut c = cascade.clone();
    let (outer, tile) = (group.outer, group.tile);
    let ge = c.einsums[group.max_einsum].clone();
    let g_name = c.tensors[ge.output.tensor].name.clone();
    let f_g = output_ranks(&ge);
    let g_out = ranks_of(&ge.output.indices);
    let slice = IndexExpr::rank(outer);
    let part_max = temp(
        &mut c,
        &format!("{g_name}_part"),
        with_ranks(outer, &f_g),
        None,
    );
    let mut added = vec![Einsum {
        output: access(part_max, with_rank(&g_out, slice.clone())),
        expr: group.operand.clone(),
        reductions: vec![Reduction {
            rank: tile,
            op: ReduceOp::Max,
        }],
        mask: ge.mask.clone(),
        value_mask: Vec::new(),
        recurrence: None,
        span: ge.span,
    }];
    // The maximum becomes the max over slices of the slice maxima.
    c.einsums[group.max_einsum] = Einsum {
        output: ge.output.clone(),
        expr: Expr::Access(access(part_max, with_rank(&g_out, slice.clone()))),
        reductions: vec![Reduction {
            rank: outer,
            op: ReduceOp::Max,
        }],
        mask: vec![],
        value_mask: Vec::new(),
        recurrence: None,
        span: ge.span,
    };
    for s in &group.sums {
        let ue = c.einsums[s.einsum].clone();
        let u_name = c.tensors[ue.output.tensor].name.clone();
        let f_u = output_ranks(&ue);
        let u_out = ranks_of(&ue.output.indices);
        let part_sum = temp(
            &mut c,
            &format!("{u_name}_part"),
            with_ranks(outer, &f_u),
            None,
        );
        let slice_max = Expr::Access(access(
            part_max,
            with_rank(&s.max_read.indices, slice.clone()),
        ));
        added.push(Einsum {
            output: access(part_sum, with_rank(&u_out, slice.clone())),
            expr: times(
                exp(sub(s.operand.clone(), slice_max.clone())),
                s.weight.clone(),
            ),
            reductions: vec![Reduction {
                rank: tile,
                op: ReduceOp::Sum,
            }],
            mask: s.mask.clone(),
            value_mask: Vec::new(),
            recurrence: None,
            span: ue.span,
        });
        c.einsums[s.einsum] = Einsum {
            output: ue.output.clone(),
            expr: Expr::binary(
                BinaryOp::Mul,
                exp(sub(
                    slice_max,
                    clamp(Expr::Access(s.max_read.clone()), group.maskable),
                )),
                Expr::Access(access(part_sum, with_rank(&u_out, slice.clone()))),
            ),
            reductions: vec![Reduction {
                rank: outer,
                op: ReduceOp::Sum,
            }],
            mask: vec![],
            value_mask: Vec::new(),
            recurrence: None,
            span: ue.span,
        };
    }
    for e in added {
        c.einsums.append(e);
    }
    ir_util::tidy(&mut c);
    c
}

/// Plain ranks some Einsum max-reduces on its own, with the number of output points of
/// that Einsum (the independent rows a pass over the rank serves).
pub fn max_reduced_ranks(cascade: &Cascade) -> Vec<(Handle<Rank>, u64)> {
    let mut out: Vec<(Handle<Rank>, u64)> = Vec::new();
    for (_, e) in cascade.einsums.iter() {
        if let [red] = e.reductions.as_slice() {
            let r = &cascade.ranks[red.rank];
            if red.op == ReduceOp::Max
                && e.recurrence.is_none()
                && r.split.is_none()
                && r.parent.is_none()
                && matches!(r.source, ExtentSource::Literal | ExtentSource::Symbol(_))
                && !out.iter().any(|(q, _)| *q == red.rank)
            {
                let points = e
                    .output
                    .indices
                    .iter()
                    .flat_map(|i| i.ranks().collect::<Vec<_>>())
                    .map(|q| cascade.ranks[q].extent)
                    .fold(1u64, u64::saturating_mul);
                out.push((red.rank, points));
            }
        }
    }
    out
}
