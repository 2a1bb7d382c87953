//! The e-graph language over Cascade IR expressions.
//!
//! A term is one Einsum's value with every temporary it reads inlined: map operators,
//! reductions and masks are nodes; tensor accesses, rank values, rank binders, reduction
//! operators and mask conditions are leaves that index side tables ([`Leaves`]), so the
//! e-graph hash-conses equal accesses without knowing what an access is.
//!
//! - `(reduce OP RANK body)`: `OP` over `RANK` of `body`, with the IR's semantics (absent
//!   points are skipped, the result is always present);
//! - `(mask COND body)`: `body` where `COND` holds, absent elsewhere.
//!
//! The analysis keeps, per e-class, the ranks free in it and whether it may be absent:
//! the side conditions of every rule that moves a factor across a reduction.

use egg::{define_language, Analysis, DidMerge, EGraph, Id, Language};
use einattn_ir::{Access, BinaryOp, Condition, Handle, IndexExpr, Rank, ReduceOp, UnaryOp};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A set of ranks, by handle index. Cascades with more than 128 ranks are not rewritten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RankSet(pub u128);

/// The largest rank count [`RankSet`] can hold.
pub const MAX_RANKS: usize = 128;

impl RankSet {
    pub fn single(rank: Handle<Rank>) -> RankSet {
        RankSet(1u128 << rank.index())
    }
    pub fn of(ranks: impl IntoIterator<Item = Handle<Rank>>) -> RankSet {
        ranks.into_iter().fold(RankSet::default(), |s, r| s.with(r))
    }
    pub fn with(self, rank: Handle<Rank>) -> RankSet {
        RankSet(self.0 | (1u128 << rank.index()))
    }
    pub fn without(self, rank: Handle<Rank>) -> RankSet {
        RankSet(self.0 & !(1u128 << rank.index()))
    }
    pub fn union(self, other: RankSet) -> RankSet {
        RankSet(self.0 | other.0)
    }
    pub fn contains(self, rank: Handle<Rank>) -> bool {
        self.0 & (1u128 << rank.index()) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The ranks in handle (declaration) order.
    pub fn ranks(self) -> Vec<Handle<Rank>> {
        (0..MAX_RANKS)
            .filter(|&i| self.0 & (1u128 << i) != 0)
            .map(Handle::new)
            .collect()
    }
}

/// A literal, ordered and hashed by its bits so it can be an e-node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Num(u64);

impl Num {
    pub fn new(value: f64) -> Num {
        // One NaN and one zero, so equal values are one e-node.
        let value = if value.is_nan() {
            f64::NAN
        } else if value == 0.0 {
            0.0
        } else {
            value
        };
        Num(value.to_bits())
    }
    pub fn value(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.value())
    }
}

impl FromStr for Num {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        s.parse::<f64>().map(Num::new).map_err(|_| ())
    }
}

/// A leaf: an index into one of the [`Leaves`] tables, a rank binder or a reduction
/// operator. Printed as `a3` (access), `i2` (rank value), `r5` (rank), `c1` (condition),
/// or the operator's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leaf {
    Access(u32),
    Index(u32),
    Rank(u32),
    Cond(u32),
    Op(ReduceKey),
}

/// [`ReduceOp`] with an order, for use inside e-nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReduceKey {
    Sum,
    Prod,
    Max,
    Min,
}

impl ReduceKey {
    pub fn of(op: ReduceOp) -> ReduceKey {
        match op {
            ReduceOp::Sum => ReduceKey::Sum,
            ReduceOp::Prod => ReduceKey::Prod,
            ReduceOp::Max => ReduceKey::Max,
            ReduceOp::Min => ReduceKey::Min,
        }
    }
    pub fn op(self) -> ReduceOp {
        match self {
            ReduceKey::Sum => ReduceOp::Sum,
            ReduceKey::Prod => ReduceOp::Prod,
            ReduceKey::Max => ReduceOp::Max,
            ReduceKey::Min => ReduceOp::Min,
        }
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::Access(i) => write!(f, "a{i}"),
            Leaf::Index(i) => write!(f, "i{i}"),
            Leaf::Rank(i) => write!(f, "r{i}"),
            Leaf::Cond(i) => write!(f, "c{i}"),
            Leaf::Op(op) => f.write_str(op.op().name()),
        }
    }
}

impl FromStr for Leaf {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if let Some(op) = ReduceOp::from_name(s) {
            return Ok(Leaf::Op(ReduceKey::of(op)));
        }
        let (kind, number) = s.split_at(s.len().min(1));
        let n: u32 = number.parse().map_err(|_| ())?;
        match kind {
            "a" => Ok(Leaf::Access(n)),
            "i" => Ok(Leaf::Index(n)),
            "r" => Ok(Leaf::Rank(n)),
            "c" => Ok(Leaf::Cond(n)),
            _ => Err(()),
        }
    }
}

define_language! {
    /// Extended-Einsum expressions: see the module documentation.
    pub enum Ein {
        "+" = Add([Id; 2]),
        "-" = Sub([Id; 2]),
        "*" = Mul([Id; 2]),
        "/" = Div([Id; 2]),
        "max" = Max([Id; 2]),
        "min" = Min([Id; 2]),
        "<" = Lt([Id; 2]),
        "<=" = Le([Id; 2]),
        ">" = Gt([Id; 2]),
        ">=" = Ge([Id; 2]),
        "==" = Eq([Id; 2]),
        "!=" = Ne([Id; 2]),
        "neg" = Neg([Id; 1]),
        "exp" = Exp([Id; 1]),
        "log" = Log([Id; 1]),
        "sqrt" = Sqrt([Id; 1]),
        "tanh" = Tanh([Id; 1]),
        "reduce" = Reduce([Id; 3]),
        "mask" = Mask([Id; 2]),
        Num(Num),
        Leaf(Leaf),
    }
}

impl Ein {
    pub fn binary(op: BinaryOp, a: Id, b: Id) -> Ein {
        let c = [a, b];
        match op {
            BinaryOp::Add => Ein::Add(c),
            BinaryOp::Sub => Ein::Sub(c),
            BinaryOp::Mul => Ein::Mul(c),
            BinaryOp::Div => Ein::Div(c),
            BinaryOp::Max => Ein::Max(c),
            BinaryOp::Min => Ein::Min(c),
            BinaryOp::Lt => Ein::Lt(c),
            BinaryOp::Le => Ein::Le(c),
            BinaryOp::Gt => Ein::Gt(c),
            BinaryOp::Ge => Ein::Ge(c),
            BinaryOp::Eq => Ein::Eq(c),
            BinaryOp::Ne => Ein::Ne(c),
        }
    }

    pub fn unary(op: UnaryOp, a: Id) -> Ein {
        match op {
            UnaryOp::Neg => Ein::Neg([a]),
            UnaryOp::Exp => Ein::Exp([a]),
            UnaryOp::Log => Ein::Log([a]),
            UnaryOp::Sqrt => Ein::Sqrt([a]),
            UnaryOp::Tanh => Ein::Tanh([a]),
        }
    }

    /// The IR operator of a binary map node.
    pub fn as_binary(&self) -> Option<(BinaryOp, [Id; 2])> {
        Some(match self {
            Ein::Add(c) => (BinaryOp::Add, *c),
            Ein::Sub(c) => (BinaryOp::Sub, *c),
            Ein::Mul(c) => (BinaryOp::Mul, *c),
            Ein::Div(c) => (BinaryOp::Div, *c),
            Ein::Max(c) => (BinaryOp::Max, *c),
            Ein::Min(c) => (BinaryOp::Min, *c),
            Ein::Lt(c) => (BinaryOp::Lt, *c),
            Ein::Le(c) => (BinaryOp::Le, *c),
            Ein::Gt(c) => (BinaryOp::Gt, *c),
            Ein::Ge(c) => (BinaryOp::Ge, *c),
            Ein::Eq(c) => (BinaryOp::Eq, *c),
            Ein::Ne(c) => (BinaryOp::Ne, *c),
            _ => return None,
        })
    }

    /// The IR operator of a unary map node.
    pub fn as_unary(&self) -> Option<(UnaryOp, Id)> {
        Some(match self {
            Ein::Neg([a]) => (UnaryOp::Neg, *a),
            Ein::Exp([a]) => (UnaryOp::Exp, *a),
            Ein::Log([a]) => (UnaryOp::Log, *a),
            Ein::Sqrt([a]) => (UnaryOp::Sqrt, *a),
            Ein::Tanh([a]) => (UnaryOp::Tanh, *a),
            _ => return None,
        })
    }
}

/// The side tables leaves point into. Entries are deduplicated, so equal accesses (same
/// tensor, same index expressions) are one leaf.
#[derive(Clone, Debug, Default)]
pub struct Leaves {
    pub accesses: Vec<Access>,
    /// Per access: whether the tensor read may hold absent elements.
    pub access_may_be_absent: Vec<bool>,
    pub indices: Vec<IndexExpr>,
    pub conditions: Vec<Condition>,
    access_ids: HashMap<(usize, Vec<IndexExpr>), u32>,
    index_ids: HashMap<IndexExpr, u32>,
}

/// Sorts terms by rank so equal affine expressions compare equal.
pub fn canonical_index(index: &IndexExpr) -> IndexExpr {
    let mut out = IndexExpr::constant(index.constant);
    let mut terms: Vec<(i64, Handle<Rank>)> = index
        .terms
        .iter()
        .copied()
        .filter(|(c, _)| *c != 0)
        .collect();
    terms.sort_by_key(|(_, r)| *r);
    for (c, r) in terms {
        out.add_term(c, r);
    }
    out
}

impl Leaves {
    pub fn access(&mut self, access: &Access, may_be_absent: bool) -> Leaf {
        let indices: Vec<IndexExpr> = access.indices.iter().map(canonical_index).collect();
        let key = (access.tensor.index(), indices.clone());
        if let Some(&id) = self.access_ids.get(&key) {
            return Leaf::Access(id);
        }
        let id = self.accesses.len() as u32;
        self.accesses.push(Access {
            tensor: access.tensor,
            indices,
            span: access.span,
        });
        self.access_may_be_absent.push(may_be_absent);
        self.access_ids.insert(key, id);
        Leaf::Access(id)
    }

    pub fn index(&mut self, index: &IndexExpr) -> Leaf {
        let index = canonical_index(index);
        if let Some(&id) = self.index_ids.get(&index) {
            return Leaf::Index(id);
        }
        let id = self.indices.len() as u32;
        self.indices.push(index.clone());
        self.index_ids.insert(index, id);
        Leaf::Index(id)
    }

    pub fn condition(&mut self, condition: &Condition) -> Leaf {
        let canonical = Condition {
            lhs: canonical_index(&condition.lhs),
            op: condition.op,
            rhs: canonical_index(&condition.rhs),
            span: condition.span,
        };
        let found = self
            .conditions
            .iter()
            .position(|c| c.lhs == canonical.lhs && c.op == canonical.op && c.rhs == canonical.rhs);
        let id = found.unwrap_or_else(|| {
            self.conditions.push(canonical);
            self.conditions.len() - 1
        });
        Leaf::Cond(id as u32)
    }

    fn leaf_ranks(&self, leaf: Leaf) -> RankSet {
        match leaf {
            Leaf::Access(i) => self
                .accesses
                .get(i as usize)
                .map_or(RankSet::default(), |a| {
                    RankSet::of(a.indices.iter().flat_map(|x| x.ranks().collect::<Vec<_>>()))
                }),
            Leaf::Index(i) => self
                .indices
                .get(i as usize)
                .map_or(RankSet::default(), |x| RankSet::of(x.ranks())),
            Leaf::Cond(i) => self
                .conditions
                .get(i as usize)
                .map_or(RankSet::default(), |c| {
                    RankSet::of(c.lhs.ranks().chain(c.rhs.ranks()))
                }),
            // A binder is not a use of its rank.
            Leaf::Rank(_) | Leaf::Op(_) => RankSet::default(),
        }
    }
}

/// What the analysis knows about an e-class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassData {
    /// Ranks free in the class's terms (a reduction binds its rank).
    pub free: RankSet,
    /// Whether some point of the class may be absent (a mask, or a read of a tensor with
    /// absent elements, not under a reduction).
    pub may_be_absent: bool,
    /// For a rank-binder class, the rank.
    pub rank: Option<Handle<Rank>>,
    /// For a reduction-operator class, the operator.
    pub reduce_op: Option<ReduceKey>,
}

/// The e-class analysis: free ranks and possible absence (see [`ClassData`]).
#[derive(Clone, Debug, Default)]
pub struct EinAnalysis {
    pub leaves: Leaves,
}

pub type EinGraph = EGraph<Ein, EinAnalysis>;

impl Analysis<Ein> for EinAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EinGraph, enode: &Ein, _id: Id) -> ClassData {
        let data = |id: &Id| &egraph[*id].data;
        let plain = |free: RankSet, may_be_absent: bool| ClassData {
            free,
            may_be_absent,
            rank: None,
            reduce_op: None,
        };
        match enode {
            Ein::Num(_) => plain(RankSet::default(), false),
            Ein::Leaf(leaf) => {
                let free = egraph.analysis.leaves.leaf_ranks(*leaf);
                let absent = match leaf {
                    Leaf::Access(i) => egraph
                        .analysis
                        .leaves
                        .access_may_be_absent
                        .get(*i as usize)
                        .copied()
                        .unwrap_or(true),
                    _ => false,
                };
                ClassData {
                    free,
                    may_be_absent: absent,
                    rank: match leaf {
                        Leaf::Rank(r) => Some(Handle::new(*r as usize)),
                        _ => None,
                    },
                    reduce_op: match leaf {
                        Leaf::Op(op) => Some(*op),
                        _ => None,
                    },
                }
            }
            Ein::Reduce([_, rank, body]) => {
                let body = data(body);
                let free = match data(rank).rank {
                    Some(r) => body.free.without(r),
                    None => body.free,
                };
                // A reduction over only absent points yields its identity: never absent.
                plain(free, false)
            }
            Ein::Mask([cond, body]) => {
                let body = data(body);
                plain(body.free.union(data(cond).free), true)
            }
            other => {
                let children = other.children();
                let free = children
                    .iter()
                    .fold(RankSet::default(), |s, c| s.union(data(c).free));
                let absent = children.iter().any(|c| data(c).may_be_absent);
                plain(free, absent)
            }
        }
    }

    fn merge(&mut self, to: &mut ClassData, from: ClassData) -> DidMerge {
        // Equal terms have equal free ranks and absence; the union keeps the side
        // conditions conservative should a rule ever make them differ.
        let merged = ClassData {
            free: to.free.union(from.free),
            may_be_absent: to.may_be_absent || from.may_be_absent,
            rank: to.rank.or(from.rank),
            reduce_op: to.reduce_op.or(from.reduce_op),
        };
        let changed_to = merged != *to;
        let changed_from = merged != from;
        *to = merged;
        DidMerge(changed_to, changed_from)
    }
}
