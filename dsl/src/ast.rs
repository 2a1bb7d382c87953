//! The syntax tree of a `.ein` file, exactly as written, with the byte span of every
//! statement, name and expression. Names are not resolved here; lowering does that.

pub use einattn_ir::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub statements: Vec<Statement>,
}

/// A name as written, with where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    pub kind: StatementKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StatementKind {
    /// `kernel NAME`
    Kernel(Ident),
    /// `size S = 4096`, or `size S = 4096 fixed` (a `-D` may not change it)
    Size {
        name: Ident,
        value: u64,
        value_span: Span,
        /// The word after the value, which must be `fixed`.
        fixed: Option<Ident>,
    },
    /// `rank r: EXTENT`
    Rank { name: Ident, extent: Extent },
    /// `split r -> r1, r0: TILE`
    Split {
        parent: Ident,
        outer: Ident,
        inner: Ident,
        tile: Extent,
    },
    /// `input T[r, ...]: TYPE`, `output ...`, `param ... (= VALUE)?`
    Tensor(TensorDecl),
    /// `T[idx, ...] = prefix* RHS (where COND (and COND)*)?`
    Einsum(EinsumStatement),
    /// `init T[idx, ...] = EXPR`
    Init { target: Access, value: Expr },
    /// A statement with a syntax error, skipped after the error was recorded.
    Error,
}

/// A rank's extent or a split's tile: an integer, a name, or an affine expression of
/// size symbols (`2*N - 1`).
#[derive(Clone, Debug, PartialEq)]
pub enum Extent {
    Literal { value: u64, span: Span },
    Name(Ident),
    Expr(Expr),
}

impl Extent {
    pub fn span(&self) -> Span {
        match self {
            Extent::Literal { span, .. } => *span,
            Extent::Name(ident) => ident.span,
            Extent::Expr(e) => e.span,
        }
    }

    /// An integer or a bare name as themselves, anything else as an expression.
    pub fn from_expr(e: Expr) -> Extent {
        match e.kind {
            ExprKind::Int(value) => Extent::Literal {
                value,
                span: e.span,
            },
            ExprKind::Name(id) => Extent::Name(id),
            _ => Extent::Expr(e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeclKind {
    Input,
    Output,
    Param,
}

impl DeclKind {
    pub fn keyword(self) -> &'static str {
        match self {
            DeclKind::Input => "input",
            DeclKind::Output => "output",
            DeclKind::Param => "param",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorDecl {
    pub kind: DeclKind,
    pub name: Ident,
    /// `None` for a scalar written without brackets.
    pub ranks: Option<Vec<Ident>>,
    pub dtype: Ident,
    /// A parameter's default value, with the span of the literal.
    pub default: Option<(f64, Span)>,
}

/// `NAME` or `NAME[i, ...]` on the left of `=`.
#[derive(Clone, Debug, PartialEq)]
pub struct Access {
    pub name: Ident,
    /// `None` when written without brackets (a scalar).
    pub indices: Option<Vec<Expr>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EinsumStatement {
    pub target: Access,
    /// Reduction prefixes, outermost (leftmost) first: `max[m] sum[e] ...`.
    pub reductions: Vec<ReductionPrefix>,
    pub value: Expr,
    pub mask: Vec<Condition>,
}

/// `OP[rank]` in front of an expression. The operator is any name here; lowering accepts
/// only the ones with an identity.
#[derive(Clone, Debug, PartialEq)]
pub struct ReductionPrefix {
    pub op: Ident,
    pub ranks: Vec<Expr>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub lhs: Expr,
    pub op: CmpOp,
    pub rhs: Expr,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `a ^ b`: `a` to the power `b`, for `a > 0` (lowered as `exp(b * log(a))`).
    Pow,
    Cmp(CmpOp),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(u64),
    Float(f64),
    Inf,
    /// A bare name: a scalar tensor, a rank, an extent or a size symbol.
    Name(Ident),
    /// `T[i, ...]`
    Access {
        name: Ident,
        indices: Vec<Expr>,
    },
    /// `f(a, ...)`
    Call {
        func: Ident,
        args: Vec<Expr>,
    },
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn new(kind: ExprKind, start: usize, end: usize) -> Expr {
        Expr {
            kind,
            span: Span::new(start, end),
        }
    }
}
