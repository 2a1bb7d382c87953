//! Expression algebra the classifier needs: the linear form of a recurrence body in its
//! own state, inlining of map-only temporaries, and a few structural matchers.

use einattn_ir::{Access, BinaryOp, Cascade, Expr, Handle, IndexExpr, Rank, Tensor, UnaryOp};

/// `coefficient * state + offset`, where neither part reads the state. `None` stands for
/// an absent term (zero), so `S[k+1] = S[k] + X` has coefficient `Some(1)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearForm {
    pub coefficient: Option<Expr>,
    pub offset: Option<Expr>,
}

/// Whether `access` reads `state` at the current step of `rank` (index exactly `rank`
/// along the state's iterative dimension).
pub fn is_current_step(
    cascade: &Cascade,
    access: &Access,
    state: Handle<Tensor>,
    rank: Handle<Rank>,
) -> bool {
    if access.tensor != state {
        return false;
    }
    match cascade.tensors[state].iterative {
        Some(d) => access.indices.get(d).and_then(IndexExpr::as_rank) == Some(rank),
        None => false,
    }
}

pub fn reads_tensor(expr: &Expr, tensor: Handle<Tensor>) -> bool {
    let mut found = false;
    expr.visit_accesses(&mut |a| found |= a.tensor == tensor);
    found
}

fn add(a: Option<Expr>, b: Option<Expr>) -> Option<Expr> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(x), Some(y)) => Some(Expr::binary(BinaryOp::Add, x, y)),
    }
}

fn neg(a: Option<Expr>) -> Option<Expr> {
    a.map(|x| Expr::unary(UnaryOp::Neg, x))
}

fn scale(factor: &Expr, a: Option<Expr>, factor_left: bool) -> Option<Expr> {
    a.map(|x| {
        if is_one(&x) {
            factor.clone()
        } else if factor_left {
            Expr::binary(BinaryOp::Mul, factor.clone(), x)
        } else {
            Expr::binary(BinaryOp::Mul, x, factor.clone())
        }
    })
}

/// The linear form of `expr` in `state` read at the current step of `rank`, or `None`
/// when the expression is not affine in it (a product of two state reads, `exp(state)`,
/// a read of another step).
pub fn linear_form(
    cascade: &Cascade,
    expr: &Expr,
    state: Handle<Tensor>,
    rank: Handle<Rank>,
) -> Option<LinearForm> {
    if !reads_tensor(expr, state) {
        return Some(LinearForm {
            coefficient: None,
            offset: Some(expr.clone()),
        });
    }
    match expr {
        Expr::Access(a) if is_current_step(cascade, a, state, rank) => Some(LinearForm {
            coefficient: Some(Expr::Literal(1.0)),
            offset: None,
        }),
        Expr::Unary(UnaryOp::Neg, a) => {
            let f = linear_form(cascade, a, state, rank)?;
            Some(LinearForm {
                coefficient: neg(f.coefficient),
                offset: neg(f.offset),
            })
        }
        Expr::Binary(op @ (BinaryOp::Add | BinaryOp::Sub), a, b) => {
            let fa = linear_form(cascade, a, state, rank)?;
            let fb = linear_form(cascade, b, state, rank)?;
            let (cb, ob) = if *op == BinaryOp::Sub {
                (neg(fb.coefficient), neg(fb.offset))
            } else {
                (fb.coefficient, fb.offset)
            };
            Some(LinearForm {
                coefficient: add(fa.coefficient, cb),
                offset: add(fa.offset, ob),
            })
        }
        Expr::Binary(BinaryOp::Mul, a, b) => {
            let (factor, inner, factor_left) =
                match (reads_tensor(a, state), reads_tensor(b, state)) {
                    (false, true) => (a, b, true),
                    (true, false) => (b, a, false),
                    _ => return None,
                };
            let f = linear_form(cascade, inner, state, rank)?;
            Some(LinearForm {
                coefficient: scale(factor, f.coefficient, factor_left),
                offset: scale(factor, f.offset, factor_left),
            })
        }
        Expr::Binary(BinaryOp::Div, a, b) if !reads_tensor(b, state) => {
            let f = linear_form(cascade, a, state, rank)?;
            let div = |x: Option<Expr>| x.map(|x| Expr::binary(BinaryOp::Div, x, (**b).clone()));
            Some(LinearForm {
                coefficient: div(f.coefficient),
                offset: div(f.offset),
            })
        }
        _ => None,
    }
}

/// `max(S[k], X)` or `max(X, S[k])` (or `min`): the operator, when `expr` is a running
/// extremum of `state` along `rank`.
pub fn running_extremum(
    cascade: &Cascade,
    expr: &Expr,
    state: Handle<Tensor>,
    rank: Handle<Rank>,
) -> Option<BinaryOp> {
    match expr {
        Expr::Binary(op @ (BinaryOp::Max | BinaryOp::Min), a, b) => {
            let current =
                |e: &Expr| matches!(e, Expr::Access(x) if is_current_step(cascade, x, state, rank));
            let ok =
                (current(a) && !reads_tensor(b, state)) || (current(b) && !reads_tensor(a, state));
            ok.then_some(*op)
        }
        _ => None,
    }
}

/// Replaces reads of map-only temporaries (produced by an Einsum with no reduction, no
/// mask and no recurrence, read at the indices it was written at) by their defining
/// expressions, so `RD[k+1] = PS[k] + RD[k] * C[k]` with `C[k] = exp(RM[k] - RM[k+1])`
/// shows its coefficient's structure. Depth-limited: a cascade is acyclic outside
/// recurrences, and the guard only stops malformed input.
pub fn inline_maps(cascade: &Cascade, expr: &Expr, depth: usize) -> Expr {
    if depth > 8 {
        return expr.clone();
    }
    match expr {
        Expr::Access(a) => {
            let Some(producer) = cascade.producer(a.tensor) else {
                return expr.clone();
            };
            let e = &cascade.einsums[producer];
            let same_indices = e.output.indices == a.indices;
            if e.reductions.is_empty()
                && e.mask.is_empty()
                && e.recurrence.is_none()
                && same_indices
            {
                inline_maps(cascade, &e.expr, depth + 1)
            } else {
                expr.clone()
            }
        }
        Expr::Unary(op, a) => Expr::unary(*op, inline_maps(cascade, a, depth)),
        Expr::Binary(op, a, b) => Expr::binary(
            *op,
            inline_maps(cascade, a, depth),
            inline_maps(cascade, b, depth),
        ),
        Expr::Literal(_) | Expr::Index(_) => expr.clone(),
    }
}

/// Whether `expr` is `exp(M[k] - M[k+1])` for the state `max_state` along `rank`: the
/// rescaling factor of online softmax when the running maximum grows.
pub fn is_rescale_factor(
    cascade: &Cascade,
    expr: &Expr,
    max_state: Handle<Tensor>,
    rank: Handle<Rank>,
) -> bool {
    let Expr::Unary(UnaryOp::Exp, inner) = expr else {
        return false;
    };
    let Expr::Binary(BinaryOp::Sub, a, b) = inner.as_ref() else {
        return false;
    };
    let (Expr::Access(a), Expr::Access(b)) = (a.as_ref(), b.as_ref()) else {
        return false;
    };
    let Some(d) = cascade.tensors[max_state].iterative else {
        return false;
    };
    let next = IndexExpr {
        terms: vec![(1, rank)],
        constant: 1,
    };
    is_current_step(cascade, a, max_state, rank)
        && b.tensor == max_state
        && b.indices.get(d) == Some(&next)
        && a.indices
            .iter()
            .enumerate()
            .all(|(i, x)| i == d || b.indices.get(i) == Some(x))
}

/// Whether an expression is the literal 1 (a unit coefficient: a plain running sum).
pub fn is_one(expr: &Expr) -> bool {
    matches!(expr, Expr::Literal(v) if *v == 1.0)
}

/// Every tensor the expression reads.
pub fn tensors_read(expr: &Expr) -> Vec<Handle<Tensor>> {
    let mut out = Vec::new();
    expr.visit_accesses(&mut |a| {
        if !out.contains(&a.tensor) {
            out.push(a.tensor);
        }
    });
    out
}
