//! The derivative rules of the element-wise operators: for an Einsum's expression, the
//! partial derivative with respect to one access occurrence, as an expression over the
//! forward values at the same point.
//!
//! Every operator of the IR is covered ([`UnaryOp`], [`BinaryOp`]). Where a derivative is
//! undefined at a point the subgradient is PyTorch's: `max(a, b)`/`min(a, b)` split the
//! gradient evenly at a tie (`torch.maximum`), comparisons have derivative 0 (piecewise
//! constant), `sqrt` at 0 is infinite (as `torch.sqrt`).

use super::simplify::{add, div, mul, neg, sub};
use einattn_ir::{BinaryOp, Expr, UnaryOp};

/// The derivative of `expr` with respect to the access occurrences `targets` (their
/// positions in [`Expr::visit_accesses`] order), or `None` where it is identically 0.
/// `root_value`, when given, is the value of `expr` itself (the Einsum's output at the
/// point): a root `exp`, `tanh`, `sqrt` or `/` reuses it instead of recomputing.
pub fn derivative(expr: &Expr, targets: &[usize], root_value: Option<&Expr>) -> Option<Expr> {
    let mut counter = 0;
    go(expr, targets, &mut counter, root_value)
}

fn go(expr: &Expr, targets: &[usize], counter: &mut usize, root: Option<&Expr>) -> Option<Expr> {
    match expr {
        Expr::Literal(_) | Expr::Index(_) => None,
        Expr::Access(_) => {
            let k = *counter;
            *counter += 1;
            targets.contains(&k).then_some(Expr::Literal(1.0))
        }
        Expr::Unary(op, a) => {
            let da = go(a, targets, counter, None)?;
            let a = (**a).clone();
            let value = || root.cloned().unwrap_or_else(|| Expr::unary(*op, a.clone()));
            Some(match op {
                UnaryOp::Neg => neg(da),
                // d exp(a) = exp(a) da
                UnaryOp::Exp => mul(value(), da),
                // d log(a) = da / a
                UnaryOp::Log => div(da, a),
                // d sqrt(a) = da / (2 sqrt(a))
                UnaryOp::Sqrt => div(da, mul(Expr::Literal(2.0), value())),
                // d tanh(a) = (1 - tanh(a)^2) da
                UnaryOp::Tanh => {
                    let t = value();
                    mul(sub(Expr::Literal(1.0), mul(t.clone(), t)), da)
                }
            })
        }
        Expr::Binary(op, a, b) => {
            let da = go(a, targets, counter, None);
            let db = go(b, targets, counter, None);
            if da.is_none() && db.is_none() {
                return None;
            }
            let (a, b) = ((**a).clone(), (**b).clone());
            let lit = Expr::Literal;
            let term = |d: Option<Expr>, factor: Expr| d.map(|d| mul(factor, d));
            let sum = |x: Option<Expr>, y: Option<Expr>| match (x, y) {
                (Some(x), Some(y)) => Some(add(x, y)),
                (x, None) => x,
                (None, y) => y,
            };
            match op {
                BinaryOp::Add => sum(da, db),
                BinaryOp::Sub => sum(da, db.map(neg)),
                BinaryOp::Mul => sum(term(da, b.clone()), term(db, a.clone())),
                BinaryOp::Div => {
                    // (da - (a / b) db) / b, with a / b the Einsum's output at the root
                    let q = root
                        .cloned()
                        .unwrap_or_else(|| Expr::binary(BinaryOp::Div, a.clone(), b.clone()));
                    let num = sum(da, db.map(|d| neg(mul(q, d))))?;
                    Some(div(num, b))
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // The selected operand takes the gradient; a tie splits it evenly.
                    let (win, lose) = if *op == BinaryOp::Max {
                        (BinaryOp::Gt, BinaryOp::Lt)
                    } else {
                        (BinaryOp::Lt, BinaryOp::Gt)
                    };
                    let tie = || mul(lit(0.5), Expr::binary(BinaryOp::Eq, a.clone(), b.clone()));
                    let wa = add(Expr::binary(win, a.clone(), b.clone()), tie());
                    let wb = add(Expr::binary(lose, a.clone(), b.clone()), tie());
                    sum(term(da, wa), term(db, wb))
                }
                BinaryOp::Lt
                | BinaryOp::Le
                | BinaryOp::Gt
                | BinaryOp::Ge
                | BinaryOp::Eq
                | BinaryOp::Ne => None,
            }
        }
    }
}
