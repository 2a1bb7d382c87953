//! A small algebraic simplifier for the expressions the adjoint builds: it folds the
//! multiplications by 1 and additions of 0 that the chain rule produces, and
//! `exp(a - a)` (a stabilizer replaced by its final value) to 1. It never changes a value
//! the interpreter computes (`0 * x` is kept: `x` may be infinite).

use einattn_ir::{BinaryOp, Expr, UnaryOp};

fn is(e: &Expr, v: f64) -> bool {
    matches!(e, Expr::Literal(x) if *x == v)
}

pub fn mul(a: Expr, b: Expr) -> Expr {
    if is(&a, 1.0) {
        return b;
    }
    if is(&b, 1.0) {
        return a;
    }
    if is(&a, -1.0) {
        return neg(b);
    }
    if is(&b, -1.0) {
        return neg(a);
    }
    if let (Expr::Literal(x), Expr::Literal(y)) = (&a, &b) {
        return Expr::Literal(x * y);
    }
    Expr::binary(BinaryOp::Mul, a, b)
}

pub fn div(a: Expr, b: Expr) -> Expr {
    if is(&b, 1.0) {
        return a;
    }
    Expr::binary(BinaryOp::Div, a, b)
}

pub fn add(a: Expr, b: Expr) -> Expr {
    if is(&a, 0.0) {
        return b;
    }
    if is(&b, 0.0) {
        return a;
    }
    if let Expr::Unary(UnaryOp::Neg, nb) = &b {
        return Expr::binary(BinaryOp::Sub, a, (**nb).clone());
    }
    Expr::binary(BinaryOp::Add, a, b)
}

pub fn sub(a: Expr, b: Expr) -> Expr {
    if is(&b, 0.0) {
        return a;
    }
    if let Expr::Unary(UnaryOp::Neg, nb) = &b {
        return Expr::binary(BinaryOp::Add, a, (**nb).clone());
    }
    Expr::binary(BinaryOp::Sub, a, b)
}

pub fn neg(a: Expr) -> Expr {
    match a {
        Expr::Literal(x) => Expr::Literal(-x),
        Expr::Unary(UnaryOp::Neg, inner) => *inner,
        a => Expr::unary(UnaryOp::Neg, a),
    }
}

/// Whether two expressions compute the same value: equal up to source spans (two reads
/// of one stabilizer written at different places are the same read).
fn same(a: &Expr, b: &Expr) -> bool {
    match (a, b) {
        (Expr::Access(x), Expr::Access(y)) => x.tensor == y.tensor && x.indices == y.indices,
        (Expr::Unary(p, x), Expr::Unary(q, y)) => p == q && same(x, y),
        (Expr::Binary(p, x1, x2), Expr::Binary(q, y1, y2)) => {
            p == q && same(x1, y1) && same(x2, y2)
        }
        _ => a == b,
    }
}

/// Simplifies bottom-up: the rules above, and `exp(a - a)` = 1.
pub fn simplify(e: &Expr) -> Expr {
    match e {
        Expr::Literal(_) | Expr::Access(_) | Expr::Index(_) => e.clone(),
        Expr::Unary(op, a) => {
            let a = simplify(a);
            match (op, &a) {
                (UnaryOp::Exp, Expr::Binary(BinaryOp::Sub, x, y)) if same(x, y) => {
                    Expr::Literal(1.0)
                }
                (UnaryOp::Neg, _) => neg(a),
                _ => Expr::unary(*op, a),
            }
        }
        Expr::Binary(op, a, b) => {
            let (a, b) = (simplify(a), simplify(b));
            match op {
                BinaryOp::Mul => mul(a, b),
                BinaryOp::Div => div(a, b),
                BinaryOp::Add => add(a, b),
                BinaryOp::Sub => sub(a, b),
                _ => Expr::binary(*op, a, b),
            }
        }
    }
}
