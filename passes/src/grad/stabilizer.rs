//! Recognizes the maxima that only stabilize an exponential (the softmax pattern
//! `exp(S - M) / sum exp(S - M)`): the cascade's outputs do not change when `M` is shifted,
//! so the gradient contributions through `M` cancel and the backward treats `M` as a
//! constant. This is what turns the backward of a softmax cascade into FlashAttention-2's
//! `dS = P * (dP - D)` form.
//!
//! A candidate is a tensor produced by a `max` (or `min`) reduction, or a running maximum
//! `M[t+1] = max(M[t], X)`, whose every other read is the subtracted operand of an
//! exponential (`exp(A - M[..])`, `exp(M[..] - M[..])`). It is accepted when a shift
//! analysis proves the outputs invariant: `M` is shifted by `c` (`Add(1)`), `exp` turns an
//! additive shift into a factor `e^{kc}` (`Mult(k)`), products and quotients add and
//! subtract the factors, sums need equal ones, `log` turns a factor back into a shift,
//! recurrences must keep their state's factor from step to step, and every output must end
//! invariant. A reduction over a rank that indexes the read of `M` is refused (the shift
//! would differ along it). The analysis shifts every element of `M` by the same `c` per
//! row; the per-step independence of a running maximum's shift follows from the same
//! telescoping (`exp(M[t] - M[t+1])` carries `c_t - c_{t+1}`).

use einattn_ir::{BinaryOp, Cascade, Einsum, Expr, Handle, ReduceOp, Tensor, TensorKind, UnaryOp};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shift {
    /// Unchanged by the shift.
    Inv,
    /// `x + k c`.
    Add(i64),
    /// `x e^{k c}`.
    Mult(i64),
    /// Unknown (the state of a recurrence before its fixed point).
    Wild,
    /// Not structured: the candidate is refused.
    Bad,
}

use Shift::*;

fn add_like(a: Shift, b: Shift, sign: i64) -> Shift {
    match (a, b) {
        (Bad, _) | (_, Bad) => Bad,
        (Wild, x) => x,
        (x, Wild) => x,
        (Inv, Inv) => Inv,
        (Add(x), Add(y)) => norm_add(x + sign * y),
        (Add(x), Inv) => Add(x),
        (Inv, Add(y)) => Add(sign * y),
        (Mult(x), Mult(y)) if x == y => Mult(x),
        _ => Bad,
    }
}

fn norm_add(k: i64) -> Shift {
    if k == 0 {
        Inv
    } else {
        Add(k)
    }
}

fn norm_mult(k: i64) -> Shift {
    if k == 0 {
        Inv
    } else {
        Mult(k)
    }
}

fn factor(s: Shift) -> Option<i64> {
    match s {
        Inv => Some(0),
        Mult(k) => Some(k),
        _ => None,
    }
}

fn eval(e: &Expr, shifts: &HashMap<Handle<Tensor>, Shift>) -> Shift {
    match e {
        Expr::Literal(_) | Expr::Index(_) => Inv,
        Expr::Access(a) => shifts.get(&a.tensor).copied().unwrap_or(Inv),
        Expr::Unary(op, a) => {
            let s = eval(a, shifts);
            match (op, s) {
                (_, Bad) => Bad,
                (_, Wild) => Wild,
                (_, Inv) => Inv,
                (UnaryOp::Neg, Add(k)) => Add(-k),
                (UnaryOp::Neg, Mult(k)) => Mult(k),
                (UnaryOp::Exp, Add(k)) => Mult(k),
                (UnaryOp::Log, Mult(k)) => Add(k),
                _ => Bad,
            }
        }
        Expr::Binary(op, a, b) => {
            let (x, y) = (eval(a, shifts), eval(b, shifts));
            match op {
                BinaryOp::Add => add_like(x, y, 1),
                BinaryOp::Sub => add_like(x, y, -1),
                BinaryOp::Mul | BinaryOp::Div => {
                    if x == Bad || y == Bad {
                        return Bad;
                    }
                    if x == Wild || y == Wild {
                        return Wild;
                    }
                    match (factor(x), factor(y)) {
                        (Some(p), Some(q)) => {
                            norm_mult(if *op == BinaryOp::Mul { p + q } else { p - q })
                        }
                        _ => Bad,
                    }
                }
                BinaryOp::Max | BinaryOp::Min => match (x, y) {
                    (Wild, z) | (z, Wild) => z,
                    (p, q) if p == q => p,
                    _ => Bad,
                },
                _ => match (x, y) {
                    (Wild, _) | (_, Wild) => Inv,
                    (p, q) if p == q && p != Bad => Inv,
                    _ => Bad,
                },
            }
        }
    }
}

/// Whether every read of `m` in `expr` sits as the subtracted operand at the top of an
/// `exp` argument (or inside `exp(M - M)`).
fn reads_only_in_exp(expr: &Expr, m: Handle<Tensor>) -> bool {
    fn mentions(e: &Expr, m: Handle<Tensor>) -> bool {
        let mut found = false;
        e.visit_accesses(&mut |a| found |= a.tensor == m);
        found
    }
    fn is_m(e: &Expr, m: Handle<Tensor>) -> bool {
        matches!(e, Expr::Access(a) if a.tensor == m)
    }
    match expr {
        Expr::Literal(_) | Expr::Index(_) => true,
        Expr::Access(a) => a.tensor != m,
        Expr::Unary(UnaryOp::Exp, arg) => match &**arg {
            Expr::Binary(BinaryOp::Sub, x, y) if is_m(y, m) => is_m(x, m) || !mentions(x, m),
            other => !mentions(other, m),
        },
        Expr::Unary(_, a) => reads_only_in_exp(a, m),
        Expr::Binary(_, a, b) => reads_only_in_exp(a, m) && reads_only_in_exp(b, m),
    }
}

/// The stabilizers of `cascade`, in Einsum order.
pub fn stabilizers(cascade: &Cascade, order: &[Handle<Einsum>]) -> Vec<Handle<Tensor>> {
    let mut out = Vec::new();
    for &h in order {
        let e = &cascade.einsums[h];
        let m = e.output.tensor;
        if cascade.tensors[m].kind != TensorKind::Temp {
            continue;
        }
        let candidate = match &e.recurrence {
            None => {
                !e.reductions.is_empty()
                    && (e.reductions.iter().all(|r| r.op == ReduceOp::Max)
                        || e.reductions.iter().all(|r| r.op == ReduceOp::Min))
            }
            Some(_) => match &e.expr {
                Expr::Binary(BinaryOp::Max | BinaryOp::Min, a, b) => {
                    let state = |x: &Expr| matches!(x, Expr::Access(a) if a.tensor == m);
                    state(a) != state(b)
                }
                _ => false,
            },
        };
        if candidate && invariant(cascade, order, h) {
            out.push(m);
        }
    }
    out
}

fn invariant(cascade: &Cascade, order: &[Handle<Einsum>], producer: Handle<Einsum>) -> bool {
    let m = cascade.einsums[producer].output.tensor;
    let mut shifts: HashMap<Handle<Tensor>, Shift> = HashMap::new();
    shifts.insert(m, Add(1));
    for &h in order {
        if h == producer {
            continue;
        }
        let e = &cascade.einsums[h];
        if !reads_only_in_exp(&e.expr, m) {
            return false;
        }
        let iter_dim = cascade.tensors[m].iterative;
        let mut reduced_index = false;
        e.expr.visit_accesses(&mut |a| {
            if a.tensor == m {
                for (k, i) in a.indices.iter().enumerate() {
                    if Some(k) != iter_dim && i.ranks().any(|r| e.is_reduced(r)) {
                        reduced_index = true;
                    }
                }
            }
        });
        if reduced_index {
            return false;
        }
        for c in &e.value_mask {
            let l = eval(&c.lhs, &shifts);
            let r = eval(&c.rhs, &shifts);
            if l != Inv || r != Inv {
                return false;
            }
        }
        let out = e.output.tensor;
        let mut s = if e.recurrence.is_some() {
            shifts.insert(out, Wild);
            let first = match eval(&e.expr, &shifts) {
                Wild => Inv,
                s => s,
            };
            shifts.insert(out, first);
            let second = eval(&e.expr, &shifts);
            if second != first {
                return false;
            }
            if let Some(rec) = &e.recurrence {
                let init = eval(&rec.init, &shifts);
                let zero = matches!(rec.init, Expr::Literal(x) if x == 0.0);
                if !zero && init != first {
                    return false;
                }
            }
            first
        } else {
            eval(&e.expr, &shifts)
        };
        for r in &e.reductions {
            s = match (r.op, s) {
                (_, Inv) => Inv,
                (ReduceOp::Sum, Mult(k)) => Mult(k),
                (ReduceOp::Max | ReduceOp::Min, x) => x,
                _ => Bad,
            };
        }
        if s == Bad || s == Wild {
            return false;
        }
        shifts.insert(out, s);
    }
    cascade
        .outputs()
        .all(|o| shifts.get(&o).copied().unwrap_or(Inv) == Inv)
}
