//! Causal linear forms into block-chunked form (Lightning Attention-2).
//!
//! Matches `O[.., p, ..] = sum over m <= p, D of  Qf(p) * Kf(m) * exp(c (p - m))`, where
//! `Qf` are factors free of `m`, `Kf` factors free of `p`, the optional decay's
//! coefficient `c` is free of both, and `D` are any other summed ranks (the head
//! dimension). Reduction temporaries read as factors and map temporaries are seen
//! through. With `p = t B + i` and `m = s B + j`, the decay factors per block
//! (`exp(c (p - m)) = exp(c (i + 1)) exp(c B (t - 1 - s)) exp(c (B - 1 - j))` for `s < t`),
//! so the keys of earlier blocks fold into a state carried along `t`:
//!
//! ```text
//! O_intra[t,i] = sum_{j <= i} Qf(tB+i) Kf(tB+j) exp(c (i - j))
//! KV[t+1]      = exp(c B) KV[t] + sum_j exp(c (B - 1 - j)) Kf(tB+j)      KV[0] = 0
//! O[tB+i]      = O_intra[t,i] + exp(c (i + 1)) sum_D Qf(tB+i) KV[t]
//! ```
//!
//! One pass over the block rank `t`, a state over the key factors' other ranks (`d x e`
//! per batch and head), O(N B) intra-block work instead of O(N^2).

use super::ir_util::{self, expr_ranks, factors, fresh_name, product, substitute_expr};
use super::lang::canonical_index;
use einattn_ir::{
    Access, BinaryOp, Cascade, CmpOp, Condition, Einsum, Expr, ExtentSource, Handle, IndexExpr,
    Rank, Recurrence, ReduceOp, Reduction, Span, Split, Tensor, TensorKind, UnaryOp,
};
use std::collections::HashMap;

/// A causal linear form found in a cascade.
#[derive(Clone, Debug)]
pub struct CausalLinear {
    pub einsum: Handle<Einsum>,
    pub query: Handle<Rank>,
    pub key: Handle<Rank>,
    /// Factors free of the key rank.
    pub query_factors: Vec<Expr>,
    /// Factors free of the query rank.
    pub key_factors: Vec<Expr>,
    /// `c` in `exp(c (p - m))`; `None` for plain causal linear attention.
    pub decay: Option<Expr>,
    /// Summed ranks other than the key rank, innermost first.
    pub inner: Vec<Handle<Rank>>,
}

/// A sum over `reductions` of a product of `factors` where all `mask` conditions hold.
struct SumOfProducts {
    reductions: Vec<Handle<Rank>>,
    mask: Vec<Condition>,
    factors: Vec<Expr>,
}

fn all_sums(e: &Einsum) -> bool {
    e.recurrence.is_none() && e.reductions.iter().all(|r| r.op == ReduceOp::Sum)
}

/// Flattens an all-sum Einsum, reading through reduction temporaries used as factors.
fn flatten(cascade: &Cascade, e: &Einsum) -> Option<SumOfProducts> {
    if !all_sums(e) {
        return None;
    }
    let mut mask = e.mask.clone();
    let view = view(cascade, &e.expr, &mut mask);
    let mut sop = SumOfProducts {
        reductions: e.reductions.iter().map(|r| r.rank).collect(),
        mask,
        factors: Vec::new(),
    };
    let mut pending = factors(&view);
    let mut depth = 0;
    while let Some(f) = pending.pop() {
        depth += 1;
        if depth > 256 {
            return None;
        }
        let inlined = match &f {
            Expr::Access(a) => inline_sum(cascade, a, &sop, e),
            _ => None,
        };
        match inlined {
            Some((reductions, mask, fs)) => {
                sop.reductions.extend(reductions);
                sop.mask.extend(mask);
                pending.extend(fs);
            }
            None => sop.factors.push(f),
        }
    }
    sop.factors.reverse();
    Some(sop)
}

/// Map temporaries (masked or not) replaced by their definitions; their masks join `mask`.
fn view(cascade: &Cascade, expr: &Expr, mask: &mut Vec<Condition>) -> Expr {
    ir_util::map_accesses(
        expr,
        &mut |a| {
            let producer = cascade.producer(a.tensor).map(|h| &cascade.einsums[h]);
            match producer {
                Some(p)
                    if cascade.tensors[a.tensor].kind == TensorKind::Temp
                        && p.reductions.is_empty()
                        && p.value_mask.is_empty()
                        && p.recurrence.is_none() =>
                {
                    let Some(rename) = rename_to(p, a) else {
                        return Expr::Access(a.clone());
                    };
                    mask.extend(p.mask.iter().map(|c| rename_condition(c, &rename)));
                    let def = substitute_expr(&p.expr, &rename);
                    view(cascade, &def, mask)
                }
                _ => Expr::Access(a.clone()),
            }
        },
        &HashMap::new(),
    )
}

fn rename_to(producer: &Einsum, a: &Access) -> Option<HashMap<Handle<Rank>, IndexExpr>> {
    let mut rename = HashMap::new();
    for (o, i) in producer.output.indices.iter().zip(&a.indices) {
        rename.insert(o.as_rank()?, i.clone());
    }
    Some(rename)
}

fn rename_condition(c: &Condition, rename: &HashMap<Handle<Rank>, IndexExpr>) -> Condition {
    Condition {
        lhs: ir_util::substitute_index(&c.lhs, rename),
        op: c.op,
        rhs: ir_util::substitute_index(&c.rhs, rename),
        span: c.span,
    }
}

type Inlined = (Vec<Handle<Rank>>, Vec<Condition>, Vec<Expr>);

/// A factor that reads an all-sum temporary, as its reductions, mask and factors.
fn inline_sum(
    cascade: &Cascade,
    a: &Access,
    sop: &SumOfProducts,
    outer: &Einsum,
) -> Option<Inlined> {
    if cascade.tensors[a.tensor].kind != TensorKind::Temp {
        return None;
    }
    let p = &cascade.einsums[cascade.producer(a.tensor)?];
    if !all_sums(p) || p.reductions.is_empty() {
        return None;
    }
    let rename = rename_to(p, a)?;
    // Its summed ranks must not collide with ranks already in play.
    let in_play: Vec<Handle<Rank>> = sop
        .reductions
        .iter()
        .copied()
        .chain(
            outer
                .output
                .indices
                .iter()
                .flat_map(|i| i.ranks().collect::<Vec<_>>()),
        )
        .chain(rename.values().flat_map(|i| i.ranks().collect::<Vec<_>>()))
        .collect();
    if p.reductions.iter().any(|r| in_play.contains(&r.rank)) {
        return None;
    }
    let mut mask: Vec<Condition> = p
        .mask
        .iter()
        .map(|c| rename_condition(c, &rename))
        .collect();
    let def = view(cascade, &substitute_expr(&p.expr, &rename), &mut mask);
    Some((
        p.reductions.iter().map(|r| r.rank).collect(),
        mask,
        factors(&def),
    ))
}

/// `lhs - rhs`, canonical.
fn difference(c: &Condition) -> IndexExpr {
    let mut d = c.lhs.clone();
    d.constant -= c.rhs.constant;
    for &(k, r) in &c.rhs.terms {
        d.add_term(-k, r);
    }
    canonical_index(&d)
}

fn minus(a: Handle<Rank>, b: Handle<Rank>) -> IndexExpr {
    let mut d = IndexExpr::rank(a);
    d.add_term(-1, b);
    canonical_index(&d)
}

/// Whether `c` says `m <= p`.
fn is_causal(c: &Condition, p: Handle<Rank>, m: Handle<Rank>) -> bool {
    let d = difference(c);
    (c.op == CmpOp::Le && d == minus(m, p)) || (c.op == CmpOp::Ge && d == minus(p, m))
}

/// `c` with `arg = c * (p - m)`, `c` free of `p` and `m`.
fn decay_coefficient(arg: &Expr, p: Handle<Rank>, m: Handle<Rank>) -> Option<Expr> {
    let free_of_pm = |e: &Expr| expr_ranks(e).iter().all(|&r| r != p && r != m);
    let diff = |e: &Expr| -> Option<f64> {
        match e {
            Expr::Index(x) if canonical_index(x) == minus(p, m) => Some(1.0),
            Expr::Index(x) if canonical_index(x) == minus(m, p) => Some(-1.0),
            _ => None,
        }
    };
    let scaled = |sign: f64, c: &Expr| {
        if sign > 0.0 {
            c.clone()
        } else {
            Expr::unary(UnaryOp::Neg, c.clone())
        }
    };
    match arg {
        Expr::Binary(BinaryOp::Mul, a, b) => {
            if let (Some(s), true) = (diff(b), free_of_pm(a)) {
                return Some(scaled(s, a));
            }
            if let (Some(s), true) = (diff(a), free_of_pm(b)) {
                return Some(scaled(s, b));
            }
            None
        }
        Expr::Unary(UnaryOp::Neg, a) => {
            decay_coefficient(a, p, m).map(|c| Expr::unary(UnaryOp::Neg, c))
        }
        other => diff(other).map(Expr::Literal),
    }
}

/// Finds a causal linear form (see the module documentation).
pub fn find(cascade: &Cascade) -> Option<CausalLinear> {
    // A data-dependent mask can make a factor absent, which the chunked form would turn
    // into an absent output where the sum gave 0: not chunked.
    if ir_util::has_value_masks(cascade) {
        return None;
    }
    for (h, e) in cascade.einsums.iter() {
        if e.reductions.is_empty() || !e.output.indices.iter().all(|i| i.as_rank().is_some()) {
            continue;
        }
        let Some(sop) = flatten(cascade, e) else {
            continue;
        };
        let [causal] = sop.mask.as_slice() else {
            continue;
        };
        let free: Vec<Handle<Rank>> = e
            .output
            .indices
            .iter()
            .filter_map(IndexExpr::as_rank)
            .collect();
        for &p in &free {
            for &m in &sop.reductions {
                if !is_causal(causal, p, m) || cascade.ranks[p].extent != cascade.ranks[m].extent {
                    continue;
                }
                if let Some(found) = classify(cascade, h, &sop, p, m) {
                    return Some(found);
                }
            }
        }
    }
    None
}

fn classify(
    cascade: &Cascade,
    einsum: Handle<Einsum>,
    sop: &SumOfProducts,
    p: Handle<Rank>,
    m: Handle<Rank>,
) -> Option<CausalLinear> {
    let rank_ok = |r: Handle<Rank>| {
        let rank = &cascade.ranks[r];
        rank.split.is_none() && rank.parent.is_none()
    };
    if !rank_ok(p) || !rank_ok(m) {
        return None;
    }
    let (mut query_factors, mut key_factors, mut decay) = (Vec::new(), Vec::new(), None);
    for f in &sop.factors {
        let ranks = expr_ranks(f);
        match (ranks.contains(&p), ranks.contains(&m)) {
            (true, true) => {
                let Expr::Unary(UnaryOp::Exp, arg) = f else {
                    return None;
                };
                if decay.is_some() {
                    return None;
                }
                decay = Some(decay_coefficient(arg, p, m)?);
            }
            (false, true) => key_factors.push(f.clone()),
            _ => query_factors.push(f.clone()),
        }
    }
    if key_factors.is_empty() {
        return None;
    }
    Some(CausalLinear {
        einsum,
        query: p,
        key: m,
        query_factors,
        key_factors,
        decay,
        inner: sop.reductions.iter().copied().filter(|&r| r != m).collect(),
    })
}

fn access(tensor: Handle<Tensor>, indices: Vec<IndexExpr>) -> Access {
    Access {
        tensor,
        indices,
        span: Span::UNKNOWN,
    }
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

fn plain(ranks: &[Handle<Rank>]) -> Vec<IndexExpr> {
    ranks.iter().map(|&r| IndexExpr::rank(r)).collect()
}

/// `exp(c * x)`, or nothing without a decay.
fn decay_factor(decay: &Option<Expr>, x: Expr) -> Option<Expr> {
    decay
        .as_ref()
        .map(|c| Expr::unary(UnaryOp::Exp, Expr::binary(BinaryOp::Mul, c.clone(), x)))
}

/// Rewrites the form into blocks of `block` positions. `block` must divide the sequence.
pub fn chunk(cascade: &Cascade, found: &CausalLinear, block: u64) -> Option<Cascade> {
    let mut c = cascade.clone();
    let n = c.ranks[found.query].extent;
    if block == 0 || !n.is_multiple_of(block) {
        return None;
    }
    let (p, m) = (found.query, found.key);
    let o = c.einsums[found.einsum].clone();
    let o_name = c.tensors[o.output.tensor].name.clone();
    let qname = c.ranks[p].name.clone();
    let t = c.ranks.append(Rank {
        name: ir_util::fresh_rank_name(&c, "t"),
        extent: n / block,
        source: ExtentSource::SplitOuter,
        split: None,
        parent: Some(p),
        span: Span::UNKNOWN,
    });
    let i = c.ranks.append(Rank {
        name: ir_util::fresh_rank_name(&c, &format!("{qname}0")),
        extent: block,
        source: ExtentSource::SplitTile,
        split: None,
        parent: Some(p),
        span: Span::UNKNOWN,
    });
    c.ranks[p].split = Some(Split { outer: t, inner: i });
    // Keys inside a block get a tile rank of their own, split from the key rank so reads
    // of key tensors stay within the key rank's family; keys are addressed by the query
    // block `t` (the block being processed), so the key split's outer rank goes unused.
    let key_name = c.ranks[m].name.clone();
    let key_blocks = c.ranks.append(Rank {
        name: ir_util::fresh_rank_name(&c, &format!("{key_name}1")),
        extent: n / block,
        source: ExtentSource::SplitOuter,
        split: None,
        parent: Some(m),
        span: Span::UNKNOWN,
    });
    let j = c.ranks.append(Rank {
        name: ir_util::fresh_rank_name(&c, "j"),
        extent: block,
        source: ExtentSource::SplitTile,
        split: None,
        parent: Some(m),
        span: Span::UNKNOWN,
    });
    c.ranks[m].split = Some(Split {
        outer: key_blocks,
        inner: j,
    });
    // Outer term first: the form the printer recognizes as the split parent.
    let at = |r: Handle<Rank>| IndexExpr {
        terms: vec![(block as i64, t), (1, r)],
        constant: 0,
    };
    let qrename: HashMap<_, _> = [(p, at(i))].into_iter().collect();
    let krename: HashMap<_, _> = [(m, at(j))].into_iter().collect();
    let qf: Vec<Expr> = found
        .query_factors
        .iter()
        .map(|f| substitute_expr(f, &qrename))
        .collect();
    let kf: Vec<Expr> = found
        .key_factors
        .iter()
        .map(|f| substitute_expr(f, &krename))
        .collect();
    let index = |terms: &[(i64, Handle<Rank>)], constant: i64| {
        let mut x = IndexExpr::constant(constant);
        for &(k, r) in terms {
            x.add_term(k, r);
        }
        Expr::Index(x)
    };

    // The state spans the key factors' ranks (and the decay's), less the key rank.
    let mut state_ranks: Vec<Handle<Rank>> = found
        .key_factors
        .iter()
        .chain(found.decay.iter())
        .flat_map(expr_ranks)
        .filter(|&r| r != m)
        .collect();
    state_ranks.sort();
    state_ranks.dedup();
    let others: Vec<Handle<Rank>> = o
        .output
        .indices
        .iter()
        .filter_map(IndexExpr::as_rank)
        .filter(|&r| r != p)
        .collect();
    let block_ranks: Vec<Handle<Rank>> = [t, i].into_iter().chain(others.iter().copied()).collect();
    let sums = |ranks: &[Handle<Rank>]| -> Vec<Reduction> {
        ranks
            .iter()
            .map(|&r| Reduction {
                rank: r,
                op: ReduceOp::Sum,
            })
            .collect()
    };

    let intra = temp(&mut c, &format!("{o_name}I"), block_ranks.clone(), None);
    let state_base = ir_util::name_from_reads(&c, &product(found.key_factors.clone()));
    let state = temp(
        &mut c,
        &state_base,
        std::iter::once(t)
            .chain(state_ranks.iter().copied())
            .collect(),
        Some(0),
    );
    let update = temp(
        &mut c,
        &format!("{state_base}U"),
        std::iter::once(t)
            .chain(state_ranks.iter().copied())
            .collect(),
        None,
    );
    let inter_base = format!(
        "{}{}",
        ir_util::name_from_reads(&c, &product(found.query_factors.clone())),
        state_base
    );
    let inter = temp(&mut c, &inter_base, block_ranks.clone(), None);

    let mut intra_factors = qf.clone();
    intra_factors.extend(kf.iter().cloned());
    intra_factors.extend(decay_factor(&found.decay, index(&[(1, i), (-1, j)], 0)));
    let mut intra_reductions = sums(&found.inner);
    intra_reductions.push(Reduction {
        rank: j,
        op: ReduceOp::Sum,
    });

    let state_at = |step: IndexExpr| {
        Expr::Access(access(
            state,
            std::iter::once(step).chain(plain(&state_ranks)).collect(),
        ))
    };
    let mut next = IndexExpr::rank(t);
    next.constant = 1;
    let mut inter_factors = qf.clone();
    inter_factors.push(state_at(IndexExpr::rank(t)));

    let mut update_factors: Vec<Expr> =
        decay_factor(&found.decay, index(&[(-1, j)], block as i64 - 1))
            .into_iter()
            .collect();
    update_factors.extend(kf.iter().cloned());

    let carried = match decay_factor(&found.decay, Expr::Literal(block as f64)) {
        Some(d) => Expr::binary(BinaryOp::Mul, d, state_at(IndexExpr::rank(t))),
        None => state_at(IndexExpr::rank(t)),
    };
    let inter_read = Expr::Access(access(inter, plain(&block_ranks)));
    let inter_term = match decay_factor(&found.decay, index(&[(1, i)], 1)) {
        Some(d) => Expr::binary(BinaryOp::Mul, d, inter_read),
        None => inter_read,
    };
    let output_indices: Vec<IndexExpr> = o
        .output
        .indices
        .iter()
        .map(|x| ir_util::substitute_index(x, &qrename))
        .collect();

    let added = vec![
        Einsum {
            output: access(intra, plain(&block_ranks)),
            expr: product(intra_factors),
            reductions: intra_reductions,
            mask: vec![Condition {
                lhs: IndexExpr::rank(j),
                op: CmpOp::Le,
                rhs: IndexExpr::rank(i),
                span: Span::UNKNOWN,
            }],
            value_mask: Vec::new(),
            recurrence: None,
            span: o.span,
        },
        Einsum {
            output: access(
                update,
                std::iter::once(IndexExpr::rank(t))
                    .chain(plain(&state_ranks))
                    .collect(),
            ),
            expr: product(update_factors),
            reductions: sums(&[j]),
            mask: vec![],
            value_mask: Vec::new(),
            recurrence: None,
            span: Span::UNKNOWN,
        },
        Einsum {
            output: access(
                state,
                std::iter::once(next).chain(plain(&state_ranks)).collect(),
            ),
            expr: Expr::binary(
                BinaryOp::Add,
                carried,
                Expr::Access(access(
                    update,
                    std::iter::once(IndexExpr::rank(t))
                        .chain(plain(&state_ranks))
                        .collect(),
                )),
            ),
            reductions: vec![],
            mask: vec![],
            value_mask: Vec::new(),
            recurrence: Some(Recurrence {
                rank: t,
                init: Expr::Literal(0.0),
                init_span: Span::UNKNOWN,
                reverse: false,
            }),
            span: Span::UNKNOWN,
        },
        Einsum {
            output: access(inter, plain(&block_ranks)),
            expr: product(inter_factors),
            reductions: sums(&found.inner),
            mask: vec![],
            value_mask: Vec::new(),
            recurrence: None,
            span: Span::UNKNOWN,
        },
    ];
    c.einsums[found.einsum] = Einsum {
        output: access(o.output.tensor, output_indices),
        expr: Expr::binary(
            BinaryOp::Add,
            Expr::Access(access(intra, plain(&block_ranks))),
            inter_term,
        ),
        reductions: vec![],
        mask: vec![],
        value_mask: Vec::new(),
        recurrence: None,
        span: o.span,
    };
    for e in added {
        c.einsums.append(e);
    }
    ir_util::tidy(&mut c);
    Some(c)
}
