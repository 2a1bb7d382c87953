//! The Cascade IR: a bound (all sizes are integers) program of extended Einsums.
//!
//! Ranks, tensors and Einsums live in arenas. Expressions are small trees owned by their
//! Einsum: they are never shared, and rewrites rebuild them wholesale.

use crate::arena::{Arena, Handle};
use serde::Serialize;
use std::fmt;

/// Byte offsets into the source text the entity came from. `Span::UNKNOWN` for entities
/// built by passes rather than parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub const UNKNOWN: Span = Span { start: 0, end: 0 };

    pub fn new(start: usize, end: usize) -> Self {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    pub fn is_unknown(self) -> bool {
        self == Span::UNKNOWN
    }

    pub fn join(self, other: Span) -> Span {
        if self.is_unknown() {
            return other;
        }
        if other.is_unknown() {
            return self;
        }
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bf16,
    F16,
    F32,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        match name {
            "bf16" => Some(DType::Bf16),
            "f16" => Some(DType::F16),
            "f32" => Some(DType::F32),
            _ => None,
        }
    }
}

/// How a rank's extent was written, kept so reports and the printer can say `N` rather
/// than `4096`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ExtentSource {
    /// A literal in the source.
    Literal,
    /// A size symbol (`rank m: M`), bound by `-D M=...` or a `size` declaration.
    Symbol(String),
    /// The outer rank of a split: the parent's extent divided by the tile.
    SplitOuter,
    /// The tile rank of a split.
    SplitTile,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Split {
    pub outer: Handle<Rank>,
    pub inner: Handle<Rank>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rank {
    pub name: String,
    pub extent: u64,
    pub source: ExtentSource,
    /// Set on a rank that has been split into `outer` × `inner` (`m = m1 * M0 + m0`).
    pub split: Option<Split>,
    /// Set on the two children of a split.
    pub parent: Option<Handle<Rank>>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorKind {
    /// Read from memory, supplied by the caller.
    Input,
    /// A scalar or small per-rank parameter (a scale, a per-head decay): supplied by the caller.
    Param,
    /// Written to memory for the caller.
    Output,
    /// Produced and consumed inside the cascade.
    Temp,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tensor {
    pub name: String,
    /// The ranks in storage order (row-major: the last rank is contiguous).
    pub ranks: Vec<Handle<Rank>>,
    pub kind: TensorKind,
    /// Storage type; `None` for temporaries, whose precision is a schedule choice.
    pub dtype: Option<DType>,
    /// For a state advanced by a recurrence: the position in `ranks` of its iterative rank.
    /// That dimension holds `extent + 1` steps (`0` is the init, `extent` the final state).
    pub iterative: Option<usize>,
    /// A parameter's default value, used when the caller supplies none.
    pub default: Option<f64>,
    pub span: Span,
}

/// An affine integer expression over rank indices: `sum(coef * rank) + constant`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct IndexExpr {
    pub terms: Vec<(i64, Handle<Rank>)>,
    pub constant: i64,
}

impl IndexExpr {
    pub fn rank(rank: Handle<Rank>) -> Self {
        IndexExpr {
            terms: vec![(1, rank)],
            constant: 0,
        }
    }

    pub fn constant(value: i64) -> Self {
        IndexExpr {
            terms: Vec::new(),
            constant: value,
        }
    }

    /// `Some(rank)` when the expression is exactly one rank with coefficient 1 and no offset.
    pub fn as_rank(&self) -> Option<Handle<Rank>> {
        match self.terms.as_slice() {
            [(1, r)] if self.constant == 0 => Some(*r),
            _ => None,
        }
    }

    pub fn ranks(&self) -> impl Iterator<Item = Handle<Rank>> + '_ {
        self.terms.iter().filter(|(c, _)| *c != 0).map(|(_, r)| *r)
    }

    pub fn mentions(&self, rank: Handle<Rank>) -> bool {
        self.ranks().any(|r| r == rank)
    }

    /// Evaluates under a rank -> index assignment.
    pub fn eval(&self, index_of: impl Fn(Handle<Rank>) -> i64) -> i64 {
        self.terms
            .iter()
            .fold(self.constant, |acc, (c, r)| acc + c * index_of(*r))
    }

    /// Adds `coef * rank`, merging with an existing term and dropping zero terms.
    pub fn add_term(&mut self, coef: i64, rank: Handle<Rank>) {
        if let Some(t) = self.terms.iter_mut().find(|(_, r)| *r == rank) {
            t.0 += coef;
        } else {
            self.terms.push((coef, rank));
        }
        self.terms.retain(|(c, _)| *c != 0);
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Access {
    pub tensor: Handle<Tensor>,
    pub indices: Vec<IndexExpr>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Tanh,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Tanh => "tanh",
        }
    }

    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl BinaryOp {
    pub fn apply(self, a: f64, b: f64) -> f64 {
        let truth = |c: bool| if c { 1.0 } else { 0.0 };
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
            BinaryOp::Lt => truth(a < b),
            BinaryOp::Le => truth(a <= b),
            BinaryOp::Gt => truth(a > b),
            BinaryOp::Ge => truth(a >= b),
            BinaryOp::Eq => truth(a == b),
            BinaryOp::Ne => truth(a != b),
        }
    }

    /// The infix spelling, or `None` for operators written as calls (`max(a, b)`).
    pub fn infix(self) -> Option<&'static str> {
        Some(match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Max | BinaryOp::Min => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Lt => "lt",
            BinaryOp::Le => "le",
            BinaryOp::Gt => "gt",
            BinaryOp::Ge => "ge",
            BinaryOp::Eq => "eq",
            BinaryOp::Ne => "ne",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Expr {
    Literal(f64),
    Access(Access),
    /// A rank index used as a value (`p - m` for ALiBi, decay exponents).
    Index(IndexExpr),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn unary(op: UnaryOp, a: Expr) -> Expr {
        Expr::Unary(op, Box::new(a))
    }

    pub fn binary(op: BinaryOp, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }

    /// Calls `f` on every tensor access, left to right.
    pub fn visit_accesses<'a>(&'a self, f: &mut impl FnMut(&'a Access)) {
        match self {
            Expr::Literal(_) | Expr::Index(_) => {}
            Expr::Access(a) => f(a),
            Expr::Unary(_, a) => a.visit_accesses(f),
            Expr::Binary(_, a, b) => {
                a.visit_accesses(f);
                b.visit_accesses(f);
            }
        }
    }

    /// Calls `f` on every index expression: access indices and rank values.
    pub fn visit_indices<'a>(&'a self, f: &mut impl FnMut(&'a IndexExpr)) {
        match self {
            Expr::Literal(_) => {}
            Expr::Index(i) => f(i),
            Expr::Access(a) => a.indices.iter().for_each(&mut *f),
            Expr::Unary(_, a) => a.visit_indices(f),
            Expr::Binary(_, a, b) => {
                a.visit_indices(f);
                b.visit_indices(f);
            }
        }
    }

    /// Number of scalar map operators (each unary or binary node counts one).
    pub fn op_count(&self) -> u64 {
        match self {
            Expr::Literal(_) | Expr::Access(_) | Expr::Index(_) => 0,
            Expr::Unary(_, a) => 1 + a.op_count(),
            Expr::Binary(_, a, b) => 1 + a.op_count() + b.op_count(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceOp {
    Sum,
    Prod,
    Max,
    Min,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }

    pub fn from_name(name: &str) -> Option<ReduceOp> {
        match name {
            "sum" => Some(ReduceOp::Sum),
            "prod" => Some(ReduceOp::Prod),
            "max" => Some(ReduceOp::Max),
            "min" => Some(ReduceOp::Min),
            _ => None,
        }
    }

    /// The value a reduction over no points (or only masked points) yields.
    pub fn identity(self) -> f64 {
        match self {
            ReduceOp::Sum => 0.0,
            ReduceOp::Prod => 1.0,
            ReduceOp::Max => f64::NEG_INFINITY,
            ReduceOp::Min => f64::INFINITY,
        }
    }

    pub fn combine(self, acc: f64, x: f64) -> f64 {
        match self {
            ReduceOp::Sum => acc + x,
            ReduceOp::Prod => acc * x,
            ReduceOp::Max => acc.max(x),
            ReduceOp::Min => acc.min(x),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    pub fn holds(self, a: i64, b: i64) -> bool {
        match self {
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }
}

/// One conjunct of a mask: `lhs op rhs` over rank indices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub lhs: IndexExpr,
    pub op: CmpOp,
    pub rhs: IndexExpr,
    pub span: Span,
}

impl Condition {
    pub fn holds(&self, index_of: impl Fn(Handle<Rank>) -> i64 + Copy) -> bool {
        self.op
            .holds(self.lhs.eval(index_of), self.rhs.eval(index_of))
    }
}

/// One conjunct of a mask that compares *values* rather than affine indices: tensor
/// reads, maps, rank values (`SEG[b, p] == SEG[b, m]`, a document mask). It is checked
/// where an affine condition over the same ranks would be (the innermost reduction among
/// the ranks it mentions, or the output point), so a failing point is absent in the same
/// way. A point whose condition reads an absent value is absent too. Data-dependent: the
/// analysis cannot count its points and takes them all as present (an upper bound).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ValueCondition {
    pub lhs: Expr,
    pub op: CmpOp,
    pub rhs: Expr,
    pub span: Span,
}

impl ValueCondition {
    /// Calls `f` on every tensor access of both sides, left to right.
    pub fn visit_accesses<'a>(&'a self, f: &mut impl FnMut(&'a Access)) {
        self.lhs.visit_accesses(f);
        self.rhs.visit_accesses(f);
    }

    /// Calls `f` on every index expression of both sides.
    pub fn visit_indices<'a>(&'a self, f: &mut impl FnMut(&'a IndexExpr)) {
        self.lhs.visit_indices(f);
        self.rhs.visit_indices(f);
    }

    /// Whether the condition mentions `rank` anywhere.
    pub fn mentions(&self, rank: Handle<Rank>) -> bool {
        let mut found = false;
        self.visit_indices(&mut |i| found |= i.mentions(rank));
        found
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reduction {
    pub rank: Handle<Rank>,
    pub op: ReduceOp,
}

/// A state advanced along an iterative rank: the output is written at step `r + 1` from
/// values at step `r`; `init` gives step 0 and may not mention the iterative rank.
///
/// A *reverse* recurrence runs the other way (an adjoint state, `einattn grad`): the output
/// is written at step `r` from values at step `r + 1`, `init` gives the last step `R`, and
/// the steps run from `R - 1` down to 0.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recurrence {
    pub rank: Handle<Rank>,
    pub init: Expr,
    pub init_span: Span,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reverse: bool,
}

impl Recurrence {
    /// A forward recurrence (step 0 from `init`, steps upward).
    pub fn forward(rank: Handle<Rank>, init: Expr, init_span: Span) -> Recurrence {
        Recurrence {
            rank,
            init,
            init_span,
            reverse: false,
        }
    }

    /// The index along the iterative dimension that a step writes: `r + 1`, or `r` when
    /// reversed.
    pub fn write_index(&self) -> IndexExpr {
        IndexExpr {
            terms: vec![(1, self.rank)],
            constant: i64::from(!self.reverse),
        }
    }

    /// The index along the iterative dimension at which a step reads the state it
    /// advances (the previous step's result): `r`, or `r + 1` when reversed.
    pub fn current_index(&self) -> IndexExpr {
        IndexExpr {
            terms: vec![(1, self.rank)],
            constant: i64::from(self.reverse),
        }
    }

    /// The step `init` writes along a rank of `extent`: 0, or `extent` when reversed.
    pub fn init_step(&self, extent: u64) -> i64 {
        if self.reverse {
            i64::try_from(extent).unwrap_or(i64::MAX)
        } else {
            0
        }
    }

    /// The values of the iterative rank in evaluation order: `0..extent`, or downward.
    pub fn step_order(&self, extent: u64) -> impl Iterator<Item = i64> {
        let n = i64::try_from(extent).unwrap_or(i64::MAX);
        let reverse = self.reverse;
        (0..n).map(move |k| if reverse { n - 1 - k } else { k })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Einsum {
    pub output: Access,
    pub expr: Expr,
    /// Every reduced rank with its operator, innermost first. Implicit sums are explicit here.
    pub reductions: Vec<Reduction>,
    /// Conjunction of conditions; points where it fails are absent (they take the identity
    /// of whatever reduction consumes them, and read as 0 from a stored output).
    pub mask: Vec<Condition>,
    /// Conditions on values (data-dependent masks), conjoined with `mask`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub value_mask: Vec<ValueCondition>,
    pub recurrence: Option<Recurrence>,
    pub span: Span,
}

impl Einsum {
    /// Every rank named anywhere in the Einsum (output, value, masks, a recurrence's
    /// initial value), in order of first mention: the ranks it iterates.
    pub fn mentioned_ranks(&self) -> Vec<Handle<Rank>> {
        let mut ranks = Vec::new();
        let mut add = |i: &IndexExpr| {
            for r in i.ranks() {
                if !ranks.contains(&r) {
                    ranks.push(r);
                }
            }
        };
        self.output.indices.iter().for_each(&mut add);
        self.expr.visit_indices(&mut add);
        for c in &self.mask {
            add(&c.lhs);
            add(&c.rhs);
        }
        for c in &self.value_mask {
            c.visit_indices(&mut add);
        }
        if let Some(rec) = &self.recurrence {
            rec.init.visit_indices(&mut add);
        }
        ranks
    }

    pub fn is_reduced(&self, rank: Handle<Rank>) -> bool {
        self.reductions.iter().any(|r| r.rank == rank)
    }

    /// Calls `f` on every tensor the Einsum reads: its expression, its value conditions
    /// and its recurrence's init, in that order.
    pub fn visit_reads<'a>(&'a self, f: &mut impl FnMut(&'a Access)) {
        self.expr.visit_accesses(f);
        for c in &self.value_mask {
            c.visit_accesses(f);
        }
        if let Some(rec) = &self.recurrence {
            rec.init.visit_accesses(f);
        }
    }

    /// Calls `f` on every index expression of the body: the expression, the mask and the
    /// value conditions (not the output, not the init).
    pub fn visit_body_indices<'a>(&'a self, f: &mut impl FnMut(&'a IndexExpr)) {
        self.expr.visit_indices(f);
        for c in &self.mask {
            f(&c.lhs);
            f(&c.rhs);
        }
        for c in &self.value_mask {
            c.visit_indices(f);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Cascade {
    pub name: String,
    pub ranks: Arena<Rank>,
    pub tensors: Arena<Tensor>,
    pub einsums: Arena<Einsum>,
    /// Size symbols and their bound values, in declaration order.
    pub sizes: Vec<(String, u64)>,
    /// Size symbols whose value is built into the cascade as plain integers (a literal
    /// `D` in a value, `N - 1` in an index, a split tile): printed as `size D = 64 fixed`
    /// so that a `-D` on the printed text is refused rather than half applied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fixed_sizes: Vec<String>,
}

impl<T: Serialize> Serialize for Arena<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(|(_, t)| t))
    }
}

impl<T> Serialize for Handle<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.index() as u32)
    }
}

impl Cascade {
    pub fn rank_by_name(&self, name: &str) -> Option<Handle<Rank>> {
        self.ranks
            .iter()
            .find(|(_, r)| r.name == name)
            .map(|(h, _)| h)
    }

    pub fn tensor_by_name(&self, name: &str) -> Option<Handle<Tensor>> {
        self.tensors
            .iter()
            .find(|(_, t)| t.name == name)
            .map(|(h, _)| h)
    }

    /// The Einsum that assigns `tensor`, if any.
    pub fn producer(&self, tensor: Handle<Tensor>) -> Option<Handle<Einsum>> {
        self.einsums
            .iter()
            .find(|(_, e)| e.output.tensor == tensor)
            .map(|(h, _)| h)
    }

    /// Number of valid index positions of `tensor` along its `dim`-th rank (one more than
    /// the rank's extent for the iterative dimension of a state).
    pub fn dim_extent(&self, tensor: Handle<Tensor>, dim: usize) -> u64 {
        let t = &self.tensors[tensor];
        let extent = self.ranks[t.ranks[dim]].extent;
        if t.iterative == Some(dim) {
            // Saturating: sizes come from the user; a count at u64::MAX is reported as
            // an overflow by the analysis rather than wrapping to a small number.
            extent.saturating_add(1)
        } else {
            extent
        }
    }

    pub fn tensor_elements(&self, tensor: Handle<Tensor>) -> u64 {
        (0..self.tensors[tensor].ranks.len())
            .map(|d| self.dim_extent(tensor, d))
            .fold(1u64, u64::saturating_mul)
    }

    /// The ranks an Einsum iterates over: every rank mentioned by its output, its
    /// expression, its mask and its reductions, in first-mention order.
    pub fn iteration_ranks(&self, einsum: Handle<Einsum>) -> Vec<Handle<Rank>> {
        let e = &self.einsums[einsum];
        let mut ranks: Vec<Handle<Rank>> = Vec::new();
        let mut add = |r: Handle<Rank>| {
            if !ranks.contains(&r) {
                ranks.push(r);
            }
        };
        for i in &e.output.indices {
            i.ranks().for_each(&mut add);
        }
        e.expr.visit_indices(&mut |i| i.ranks().for_each(&mut add));
        for c in &e.mask {
            c.lhs.ranks().chain(c.rhs.ranks()).for_each(&mut add);
        }
        for c in &e.value_mask {
            c.visit_indices(&mut |i| i.ranks().for_each(&mut add));
        }
        for r in &e.reductions {
            add(r.rank);
        }
        ranks
    }

    /// Ranks that are neither reduced by any Einsum nor iterative, and that every Einsum
    /// iterates: batch, head and query ranks. Buffers are sized per point of these.
    pub fn parallel_ranks(&self) -> Vec<Handle<Rank>> {
        let spaces: Vec<Vec<Handle<Rank>>> = self
            .einsums
            .handles()
            .map(|e| self.iteration_ranks(e))
            .collect();
        self.ranks
            .handles()
            .filter(|&r| {
                self.einsums.iter().all(|(_, e)| {
                    !e.is_reduced(r) && e.recurrence.as_ref().is_none_or(|rec| rec.rank != r)
                }) && spaces.iter().all(|s| s.contains(&r))
            })
            .collect()
    }

    pub fn inputs(&self) -> impl Iterator<Item = Handle<Tensor>> + '_ {
        self.tensors
            .iter()
            .filter(|(_, t)| matches!(t.kind, TensorKind::Input | TensorKind::Param))
            .map(|(h, _)| h)
    }

    pub fn outputs(&self) -> impl Iterator<Item = Handle<Tensor>> + '_ {
        self.tensors_of(TensorKind::Output)
    }

    /// The tensors of one kind, in declaration order.
    pub fn tensors_of(&self, kind: TensorKind) -> impl Iterator<Item = Handle<Tensor>> + '_ {
        self.tensors
            .iter()
            .filter(move |(_, t)| t.kind == kind)
            .map(|(h, _)| h)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
