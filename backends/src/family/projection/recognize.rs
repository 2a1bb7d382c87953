//! Reads a cascade as row statistics of a projection: one contraction
//! `Z[t, v] = A[t, d] * B[v, d]` (two 16-bit inputs), then element-wise maps of `Z` and
//! reductions over `v` (max, sum) into per-row values, and maps of those into the outputs
//! `[t]`. The per-element values become [`ScalarExpr`]s over the logit (`Elem(Z_REG)`) and
//! row statistics (`Row(RowId(k))`, statistic `k`); each sum is then put in the form the
//! one-pass kernel accumulates (see [`SumPart`]): terms, each a row factor times an
//! exponential anchored at a running max times a function of the logit alone.

use crate::tile::ex;
use crate::tile::{BinaryOp, RegId, RowId, ScalarExpr, UnaryOp};
use einattn_ir::cascade::{self as ir, Cascade, Expr, ReduceOp, TensorKind};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_ir::Handle;
use std::collections::HashMap;

/// The placeholder tile of the logit `Z` in the expressions of a [`Reading`].
pub const Z_REG: RegId = RegId(0);

/// One running sum of a statistic: `row * sum_v exp(u(z) - M) * h(z)` where `M` is the
/// anchor's running max (no exponential when `anchor` is `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct SumPart {
    /// A factor of row statistics, applied once at the end (may read any statistic).
    pub row: ScalarExpr,
    /// The max statistic `M` and the exponent `u(z)` (of the logit alone).
    pub anchor: Option<(usize, ScalarExpr)>,
    /// A function of the logit alone.
    pub h: ScalarExpr,
}

/// A per-row value, in evaluation order.
#[derive(Debug, Clone, PartialEq)]
pub enum Stat {
    /// `max over v of arg(z)`.
    Max(ScalarExpr),
    /// `sum over v` of the sum of the parts.
    Sum(Vec<SumPart>),
    /// A map of earlier statistics.
    Row(ScalarExpr),
}

/// A cascade read as row statistics of a projection.
#[derive(Debug, Clone)]
pub struct Reading {
    pub row: Handle<ir::Rank>,
    pub col: Handle<ir::Rank>,
    pub inner: Handle<ir::Rank>,
    pub a: Handle<ir::Tensor>,
    pub b: Handle<ir::Tensor>,
    pub z: Handle<ir::Tensor>,
    pub n_rows: u64,
    pub n_cols: u64,
    pub depth: u64,
    /// The statistics and the tensor each one is, in evaluation order.
    pub stats: Vec<(Handle<ir::Tensor>, Stat)>,
    /// What each reduction reduces, unfactored (`None` for a row map): the reference.
    pub direct: Vec<Option<(ReduceOp, ScalarExpr)>>,
    /// The outputs with their statistic, in declaration order.
    pub outputs: Vec<(Handle<ir::Tensor>, usize)>,
}

fn not_mine(msg: impl Into<String>, span: ir::Span) -> Diagnostic {
    Diagnostic::error(DiagnosticKind::NotMappable, msg.into(), span)
}

/// Reads `cascade`, or says why it is not row statistics of a projection.
pub fn recognize(c: &Cascade) -> Result<Reading, Diagnostic> {
    let order = einattn_ir::validate::topological_order(c);
    let whole = ir::Span::UNKNOWN;
    // The contraction: the only Einsum that reads inputs.
    let mut proj = None;
    for &e in &order {
        let es = &c.einsums[e];
        let mut reads_input = false;
        es.expr.visit_accesses(&mut |a| {
            reads_input |= matches!(
                c.tensors[a.tensor].kind,
                TensorKind::Input | TensorKind::Param
            )
        });
        if reads_input {
            if proj.is_some() {
                return Err(not_mine(
                    "more than one Einsum reads the inputs (one projection only)",
                    es.span,
                ));
            }
            proj = Some(e);
        }
    }
    let proj = proj.ok_or_else(|| not_mine("no Einsum reads the inputs", whole))?;
    let pe = &c.einsums[proj];
    let plain = |idx: &[ir::IndexExpr]| -> Option<Vec<Handle<ir::Rank>>> {
        idx.iter().map(|i| i.as_rank()).collect()
    };
    let shape_err = || {
        not_mine(
            "the projection must be `Z[t, v] = A[t, d] * B[v, d]` (a sum over d of two inputs)",
            pe.span,
        )
    };
    let (a_acc, b_acc) = match &pe.expr {
        Expr::Binary(ir::BinaryOp::Mul, x, y) => match (&**x, &**y) {
            (Expr::Access(a), Expr::Access(b)) => (a, b),
            _ => return Err(shape_err()),
        },
        _ => return Err(shape_err()),
    };
    let out = plain(&pe.output.indices).ok_or_else(shape_err)?;
    let (ai, bi) = (
        plain(&a_acc.indices).ok_or_else(shape_err)?,
        plain(&b_acc.indices).ok_or_else(shape_err)?,
    );
    if out.len() != 2
        || ai.len() != 2
        || bi.len() != 2
        || pe.reductions.len() != 1
        || pe.reductions[0].op != ReduceOp::Sum
        || !pe.mask.is_empty()
        || !pe.value_mask.is_empty()
        || pe.recurrence.is_some()
    {
        return Err(shape_err());
    }
    let (row, col, inner) = (out[0], out[1], pe.reductions[0].rank);
    if ai != [row, inner] || bi != [col, inner] {
        return Err(shape_err());
    }
    for t in [a_acc.tensor, b_acc.tensor] {
        let ok = c.tensors[t].kind == TensorKind::Input
            && matches!(
                c.tensors[t].dtype,
                Some(ir::DType::Bf16) | Some(ir::DType::F16)
            );
        if !ok {
            return Err(not_mine(
                format!("`{}` must be a 16-bit input", c.tensors[t].name),
                pe.span,
            ));
        }
    }
    let z = pe.output.tensor;
    let mut r = Reading {
        row,
        col,
        inner,
        a: a_acc.tensor,
        b: b_acc.tensor,
        z,
        n_rows: c.ranks[row].extent,
        n_cols: c.ranks[col].extent,
        depth: c.ranks[inner].extent,
        stats: Vec::new(),
        direct: Vec::new(),
        outputs: Vec::new(),
    };
    // Per-element values of the [t, v] temporaries, and statistic numbers of [t] tensors.
    let mut elems: HashMap<Handle<ir::Tensor>, ScalarExpr> = HashMap::new();
    elems.insert(z, ex::elem(Z_REG));
    let mut rows: HashMap<Handle<ir::Tensor>, usize> = HashMap::new();
    for &e in &order {
        if e == proj {
            continue;
        }
        let es = &c.einsums[e];
        if !es.mask.is_empty() || !es.value_mask.is_empty() || es.recurrence.is_some() {
            return Err(not_mine(
                "masks and recurrences are outside a projection's row statistics",
                es.span,
            ));
        }
        let out = plain(&es.output.indices)
            .ok_or_else(|| not_mine("outputs are indexed by plain ranks", es.span))?;
        let value = translate(c, &es.expr, &elems, &rows, row, col)?;
        let t = es.output.tensor;
        let reduced = match es.reductions.as_slice() {
            [] => None,
            [red] if red.rank == col && matches!(red.op, ReduceOp::Sum | ReduceOp::Max) => {
                Some(red.op)
            }
            _ => {
                return Err(not_mine(
                    format!(
                        "`{}` reduces other than max or sum over `{}`",
                        c.tensors[t].name, c.ranks[col].name
                    ),
                    es.span,
                ))
            }
        };
        match (out.as_slice(), reduced) {
            ([x, y], None) if *x == row && *y == col => {
                if c.tensors[t].kind != TensorKind::Temp {
                    return Err(not_mine(
                        format!(
                            "`{}`: a [{}, {}] output would store the whole logit matrix",
                            c.tensors[t].name, c.ranks[row].name, c.ranks[col].name
                        ),
                        es.span,
                    ));
                }
                elems.insert(t, value);
            }
            ([x], op) if *x == row => {
                let stat = match op {
                    None => Stat::Row(value.clone()),
                    Some(ReduceOp::Max) => {
                        if reads_rows(&value) {
                            return Err(not_mine(
                                format!("the max `{}` reads a row statistic", c.tensors[t].name),
                                es.span,
                            ));
                        }
                        Stat::Max(value.clone())
                    }
                    Some(_) => {
                        Stat::Sum(sum_parts(&value, &r.stats).map_err(|m| {
                            not_mine(format!("`{}`: {m}", c.tensors[t].name), es.span)
                        })?)
                    }
                };
                rows.insert(t, r.stats.len());
                r.direct.push(op.map(|o| (o, value)));
                r.stats.push((t, stat));
            }
            _ => {
                return Err(not_mine(
                    format!(
                        "`{}` is neither [{r}] nor [{r}, {v}]",
                        c.tensors[t].name,
                        r = c.ranks[row].name,
                        v = c.ranks[col].name
                    ),
                    es.span,
                ))
            }
        }
    }
    for (t, tensor) in c.tensors.iter() {
        if tensor.kind == TensorKind::Output {
            let k = rows.get(&t).copied().ok_or_else(|| {
                not_mine(
                    format!("output `{}` is not a row statistic", tensor.name),
                    tensor.span,
                )
            })?;
            r.outputs.push((t, k));
        }
    }
    if r.outputs.is_empty() {
        return Err(not_mine("no output", whole));
    }
    Ok(r)
}

/// The cascade expression as a scalar expression over the logit and row statistics.
fn translate(
    c: &Cascade,
    e: &Expr,
    elems: &HashMap<Handle<ir::Tensor>, ScalarExpr>,
    rows: &HashMap<Handle<ir::Tensor>, usize>,
    row: Handle<ir::Rank>,
    col: Handle<ir::Rank>,
) -> Result<ScalarExpr, Diagnostic> {
    let go = |x: &Expr| translate(c, x, elems, rows, row, col);
    Ok(match e {
        Expr::Literal(v) => ex::lit(*v),
        Expr::Access(a) => {
            let idx: Option<Vec<_>> = a.indices.iter().map(|i| i.as_rank()).collect();
            let name = &c.tensors[a.tensor].name;
            let bad = || {
                not_mine(
                    format!("`{name}` is read at other indices than its own rows"),
                    a.span,
                )
            };
            match (idx.as_deref(), elems.get(&a.tensor), rows.get(&a.tensor)) {
                (Some([x, y]), Some(v), _) if *x == row && *y == col => v.clone(),
                (Some([x]), _, Some(k)) if *x == row => ex::row(RowId(*k as u32)),
                (_, None, None) => {
                    return Err(not_mine(
                        format!("`{name}` is an input other than the projection's two"),
                        a.span,
                    ))
                }
                _ => return Err(bad()),
            }
        }
        Expr::Index(_) => {
            return Err(not_mine(
                "rank indices as values are outside a projection's row statistics",
                ir::Span::UNKNOWN,
            ))
        }
        Expr::Unary(op, a) => {
            let a = go(a)?;
            match op {
                ir::UnaryOp::Neg => ex::un(UnaryOp::Neg, a),
                ir::UnaryOp::Exp => ex::un(UnaryOp::Exp, a),
                ir::UnaryOp::Log => ex::un(UnaryOp::Log, a),
                ir::UnaryOp::Sqrt => ex::un(UnaryOp::Sqrt, a),
                ir::UnaryOp::Tanh => ex::un(UnaryOp::Tanh, a),
            }
        }
        Expr::Binary(op, a, b) => {
            let (a, b) = (go(a)?, go(b)?);
            let op = match op {
                ir::BinaryOp::Add => BinaryOp::Add,
                ir::BinaryOp::Sub => BinaryOp::Sub,
                ir::BinaryOp::Mul => BinaryOp::Mul,
                ir::BinaryOp::Div => BinaryOp::Div,
                ir::BinaryOp::Max => BinaryOp::Max,
                ir::BinaryOp::Min => BinaryOp::Min,
                _ => {
                    return Err(not_mine(
                        "comparisons as values are outside a projection's row statistics",
                        ir::Span::UNKNOWN,
                    ))
                }
            };
            ex::bin(op, a, b)
        }
    })
}

fn reads_rows(e: &ScalarExpr) -> bool {
    let mut found = false;
    e.visit(&mut |x| found |= matches!(x, ScalarExpr::Row(_)));
    found
}

fn reads_z(e: &ScalarExpr) -> bool {
    let mut found = false;
    e.visit(&mut |x| found |= matches!(x, ScalarExpr::Elem(_)));
    found
}

/// `e` as a sum of signed terms (`+` and `-` distributed, nothing else).
fn terms(e: &ScalarExpr, out: &mut Vec<ScalarExpr>, negate: bool) {
    match e {
        ScalarExpr::Binary(BinaryOp::Add, a, b) => {
            terms(a, out, negate);
            terms(b, out, negate);
        }
        ScalarExpr::Binary(BinaryOp::Sub, a, b) => {
            terms(a, out, negate);
            terms(b, out, !negate);
        }
        ScalarExpr::Unary(UnaryOp::Neg, a) => terms(a, out, !negate),
        _ if negate => out.push(ex::un(UnaryOp::Neg, e.clone())),
        _ => out.push(e.clone()),
    }
}

/// `e` as a product of factors, each `(factor, inverted)`.
fn factors(e: &ScalarExpr, out: &mut Vec<(ScalarExpr, bool)>, inv: bool) {
    match e {
        ScalarExpr::Binary(BinaryOp::Mul, a, b) => {
            factors(a, out, inv);
            factors(b, out, inv);
        }
        ScalarExpr::Binary(BinaryOp::Div, a, b) => {
            factors(a, out, inv);
            factors(b, out, !inv);
        }
        ScalarExpr::Unary(UnaryOp::Neg, a) => {
            out.push((ex::lit(-1.0), false));
            factors(a, out, inv);
        }
        _ => out.push((e.clone(), inv)),
    }
}

/// The running-sum form of `sum over v of e`: each term's factors sorted into row factors,
/// functions of the logit, and exponentials, whose exponents (summed) split into a logit
/// part `u` and a row part `r`: `exp(u + r) = exp(u - M) * exp(r + M)` with `M` the max
/// statistic of `u`, so the tile only ever exponentiates `u - M <= 0`.
fn sum_parts(e: &ScalarExpr, stats: &[(Handle<ir::Tensor>, Stat)]) -> Result<Vec<SumPart>, String> {
    let mut ts = Vec::new();
    terms(e, &mut ts, false);
    let mut parts = Vec::new();
    for t in ts {
        let mut fs = Vec::new();
        factors(&t, &mut fs, false);
        let (mut row, mut h) = (ex::lit(1.0), ex::lit(1.0));
        let mut exponent: Option<ScalarExpr> = None;
        for (f, inv) in fs {
            let apply = |acc: ScalarExpr, f: ScalarExpr| {
                if inv {
                    ex::div(acc, f)
                } else {
                    ex::mul(acc, f)
                }
            };
            match (reads_z(&f), reads_rows(&f), &f) {
                (false, _, _) => row = apply(row, f),
                (true, _, ScalarExpr::Unary(UnaryOp::Exp, x)) => {
                    let x = if inv { ex::un(UnaryOp::Neg, (**x).clone()) } else { (**x).clone() };
                    exponent = Some(match exponent {
                        Some(y) => ex::add(y, x),
                        None => x,
                    });
                }
                (true, false, _) => h = apply(h, f),
                (true, true, _) => {
                    return Err(format!(
                        "a factor mixes the logit with a row statistic other than through exp (`{f:?}`)"
                    ))
                }
            }
        }
        let anchor = match exponent {
            None => None,
            Some(x) => {
                let mut xs = Vec::new();
                terms(&x, &mut xs, false);
                let (mut u, mut r) = (ex::lit(0.0), ex::lit(0.0));
                for term in xs {
                    match (reads_z(&term), reads_rows(&term)) {
                        (false, _) => r = ex::add(r, term),
                        (true, false) => u = ex::add(u, term),
                        (true, true) => {
                            return Err(
                                "an exponent mixes the logit and a row statistic in one term"
                                    .into(),
                            )
                        }
                    }
                }
                let u = simplify(u);
                let m = stats
                    .iter()
                    .position(|(_, s)| matches!(s, Stat::Max(arg) if simplify(arg.clone()) == u))
                    .ok_or_else(|| {
                        "no max over the same logit expression anchors its exponential".to_string()
                    })?;
                row = ex::mul(
                    row,
                    ex::un(UnaryOp::Exp, ex::add(r, ex::row(RowId(m as u32)))),
                );
                Some((m, u))
            }
        };
        parts.push(SumPart {
            row: simplify(row),
            anchor,
            h: simplify(h),
        });
    }
    Ok(parts)
}

/// Drops the `0 +` and `1 *` the factoring leaves, so equal exponents compare equal.
fn simplify(e: ScalarExpr) -> ScalarExpr {
    match e {
        ScalarExpr::Binary(op, a, b) => {
            let (a, b) = (simplify(*a), simplify(*b));
            match (op, &a, &b) {
                // `-M + M`: the anchor's correction of an exponent that was `z - M` already.
                (BinaryOp::Add, ScalarExpr::Unary(UnaryOp::Neg, x), y) if **x == *y => ex::lit(0.0),
                (BinaryOp::Add, ScalarExpr::Lit(z), _) if *z == 0.0 => b,
                (BinaryOp::Add | BinaryOp::Sub, _, ScalarExpr::Lit(z)) if *z == 0.0 => a,
                (BinaryOp::Mul, ScalarExpr::Lit(o), _) if *o == 1.0 => b,
                (BinaryOp::Mul | BinaryOp::Div, _, ScalarExpr::Lit(o)) if *o == 1.0 => a,
                _ => ex::bin(op, a, b),
            }
        }
        ScalarExpr::Unary(op, a) => match (op, simplify(*a)) {
            (UnaryOp::Exp, ScalarExpr::Lit(0.0)) => ex::lit(1.0),
            (op, a) => ex::un(op, a),
        },
        other => other,
    }
}
