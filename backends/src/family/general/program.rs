//! Point kernels: the kernel IR of the general lowering.
//!
//! Where the Tile IR describes one CTA's work on register and shared-memory tiles of an
//! attention-shaped problem, a point kernel describes any Einsum of any cascade one
//! *point* at a time: a thread computes whole output points (a loop nest over the reduced
//! ranks, innermost reduction innermost, with the mask checked at the level where its
//! ranks are bound), exactly as the reference interpreter does, so the two agree by
//! construction and every valid cascade has a kernel.
//!
//! A [`PointProgram`] is the cascade's kernels in evaluation order and the arrays they
//! read and write ([`Slot`]s): the cascade's inputs, parameters and outputs, and an f32
//! scratch array for every tensor that crosses kernels. A kernel ([`PointKernel`]) is one
//! of:
//! - **parallel**: one Einsum, its points spread over every thread of the grid;
//! - **recurrent**: a recurrence (or a step body of several Einsums advancing together),
//!   one CTA per point of its *instance* ranks (ranks on which no member reads another
//!   point: batch, head, and often a value column), the CTA's threads spreading each
//!   member's points, the iterative rank stepped inside the kernel with a barrier after
//!   every member;
//! - **copy**: a scratch array into an output (an output that later Einsums read is
//!   computed in scratch, where absent points stay absent, and stored at the end).
//!
//! Absent points (masked out, or computed from an absent operand) are kept in scratch as
//! a reserved NaN bit pattern ([`ABSENT_BITS`]) and stored as 0 in outputs, the
//! interpreter's semantics.

use einattn_ir::cascade::{BinaryOp, CmpOp, Condition, IndexExpr, ReduceOp, UnaryOp};
use std::fmt;

/// The f32 bit pattern that marks an absent element in scratch: a signalling NaN with a
/// payload no arithmetic produces (results of NaN arithmetic are the canonical NaN).
pub const ABSENT_BITS: u32 = 0x7F80_0A5E;

/// A rank by its index in the cascade's rank arena.
pub type RankId = usize;

#[derive(Debug, Clone, PartialEq)]
pub struct PointProgram {
    pub name: String,
    /// Every rank of the cascade, by index: name and extent.
    pub ranks: Vec<(String, u64)>,
    pub slots: Vec<Slot>,
    pub kernels: Vec<PointKernel>,
}

/// An array the kernels read or write.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub name: String,
    pub kind: SlotKind,
    pub dtype: crate::abi::Dtype,
    /// Row-major, as the cascade stores the tensor (an iterative dimension holds
    /// extent + 1 steps).
    pub shape: Vec<u64>,
}

impl Slot {
    pub fn elements(&self) -> u64 {
        self.shape.iter().fold(1, |a, &b| a.saturating_mul(b))
    }

    /// Element strides of each dimension.
    pub fn strides(&self) -> Vec<u64> {
        let mut strides = vec![1u64; self.shape.len()];
        for d in (0..self.shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1].saturating_mul(self.shape[d + 1]);
        }
        strides
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// A cascade input (always present).
    Input,
    /// A cascade parameter (always present, f32).
    Param,
    /// A cascade output: absent points are stored as 0.
    Output,
    /// An f32 array between kernels: absent points keep [`ABSENT_BITS`].
    Scratch,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PointKernel {
    Parallel {
        name: String,
        compute: Compute,
    },
    Recurrent {
        name: String,
        /// Ranks whose points the CTAs own, one point each.
        instance: Vec<RankId>,
        /// The iterative rank and its number of steps.
        rank: RankId,
        steps: u64,
        /// Whether the steps run from `steps - 1` down to 0 (a reverse recurrence).
        reverse: bool,
        /// The states' step 0, before the first step.
        inits: Vec<Compute>,
        /// Every member, in the order one step evaluates them.
        body: Vec<Compute>,
    },
    Copy {
        name: String,
        from: usize,
        to: usize,
    },
}

impl PointKernel {
    pub fn name(&self) -> &str {
        match self {
            PointKernel::Parallel { name, .. }
            | PointKernel::Recurrent { name, .. }
            | PointKernel::Copy { name, .. } => name,
        }
    }

    /// The slots it reads or writes, in slot order (its pointer parameters).
    pub fn slots(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut add = |s: usize| {
            if !out.contains(&s) {
                out.push(s);
            }
        };
        match self {
            PointKernel::Parallel { compute, .. } => compute.visit_slots(&mut add),
            PointKernel::Recurrent { inits, body, .. } => inits
                .iter()
                .chain(body)
                .for_each(|c| c.visit_slots(&mut add)),
            PointKernel::Copy { from, to, .. } => {
                add(*from);
                add(*to);
            }
        }
        out.sort_unstable();
        out
    }
}

/// One Einsum's points (or a state's step 0): `out[point] = reduce(levels) value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Compute {
    /// The Einsum, for comments and explanations.
    pub einsum: String,
    pub out: Access,
    /// The ranks the threads spread (row-major, the last fastest).
    pub points: Vec<RankId>,
    /// Conditions on the point's ranks alone: a failing point is absent.
    pub outer: Checks,
    /// Reductions, outermost first.
    pub levels: Vec<Level>,
    pub value: Expr,
}

impl Compute {
    pub fn visit_slots(&self, f: &mut impl FnMut(usize)) {
        f(self.out.slot);
        self.value.visit_slots(f);
        for c in self
            .outer
            .values
            .iter()
            .chain(self.levels.iter().flat_map(|l| &l.checks.values))
        {
            c.lhs.visit_slots(f);
            c.rhs.visit_slots(f);
        }
    }
}

/// One reduction loop and the conditions checked once its rank is bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub rank: RankId,
    pub extent: u64,
    pub op: ReduceOp,
    pub checks: Checks,
}

/// Mask conditions checked at one loop level: affine ones first, then value ones (which
/// read only where the affine ones hold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checks {
    pub affine: Vec<Condition>,
    pub values: Vec<ValueCheck>,
}

impl Checks {
    pub fn is_empty(&self) -> bool {
        self.affine.is_empty() && self.values.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValueCheck {
    pub lhs: Expr,
    pub op: CmpOp,
    pub rhs: Expr,
}

/// An element of a slot at affine indices of the ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    pub slot: usize,
    pub indices: Vec<IndexExpr>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(f64),
    Load(Access),
    /// A rank index as a value.
    Index(IndexExpr),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn visit_slots(&self, f: &mut impl FnMut(usize)) {
        match self {
            Expr::Literal(_) | Expr::Index(_) => {}
            Expr::Load(a) => f(a.slot),
            Expr::Unary(_, a) => a.visit_slots(f),
            Expr::Binary(_, a, b) => {
                a.visit_slots(f);
                b.visit_slots(f);
            }
        }
    }
}

/// `--emit tile` for the general lowering: the kernels as loop nests.
impl fmt::Display for PointProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "point program {}", self.name)?;
        for s in &self.slots {
            writeln!(
                f,
                "  {:?} {}: {}{:?}",
                s.kind,
                s.name,
                s.dtype.name(),
                s.shape
            )?;
        }
        for k in &self.kernels {
            self.fmt_kernel(f, k)?;
        }
        Ok(())
    }
}

impl PointProgram {
    fn rank(&self, r: RankId) -> &str {
        self.ranks.get(r).map_or("?", |(n, _)| n.as_str())
    }

    fn index(&self, i: &IndexExpr) -> String {
        let mut parts: Vec<String> = i
            .terms
            .iter()
            .map(|(c, r)| match c {
                1 => self.rank(r.index()).to_string(),
                -1 => format!("-{}", self.rank(r.index())),
                c => format!("{c}*{}", self.rank(r.index())),
            })
            .collect();
        if i.constant != 0 || parts.is_empty() {
            parts.push(i.constant.to_string());
        }
        parts.join(" + ").replace("+ -", "- ")
    }

    fn access(&self, a: &Access) -> String {
        let idx: Vec<String> = a.indices.iter().map(|i| self.index(i)).collect();
        format!("{}[{}]", self.slots[a.slot].name, idx.join(", "))
    }

    fn expr(&self, e: &Expr) -> String {
        match e {
            Expr::Literal(x) => format!("{x}"),
            Expr::Load(a) => self.access(a),
            Expr::Index(i) => format!("({})", self.index(i)),
            Expr::Unary(op, a) => format!("{}({})", op.name(), self.expr(a)),
            Expr::Binary(op, a, b) => match op.infix() {
                Some(sym) => format!("({} {sym} {})", self.expr(a), self.expr(b)),
                None => format!("{}({}, {})", op.name(), self.expr(a), self.expr(b)),
            },
        }
    }

    fn checks(&self, c: &Checks) -> String {
        let mut parts: Vec<String> = c
            .affine
            .iter()
            .map(|k| {
                format!(
                    "{} {} {}",
                    self.index(&k.lhs),
                    k.op.symbol(),
                    self.index(&k.rhs)
                )
            })
            .collect();
        parts.extend(c.values.iter().map(|v| {
            format!(
                "{} {} {}",
                self.expr(&v.lhs),
                v.op.symbol(),
                self.expr(&v.rhs)
            )
        }));
        parts.join(" and ")
    }

    fn fmt_compute(&self, f: &mut fmt::Formatter<'_>, c: &Compute, indent: &str) -> fmt::Result {
        let points: Vec<&str> = c.points.iter().map(|&r| self.rank(r)).collect();
        writeln!(f, "{indent}// {}", c.einsum)?;
        writeln!(f, "{indent}for ({}) in threads:", points.join(", "))?;
        if !c.outer.is_empty() {
            writeln!(f, "{indent}  where {}", self.checks(&c.outer))?;
        }
        let mut pad = format!("{indent}  ");
        for l in &c.levels {
            writeln!(
                f,
                "{pad}{} over {} < {}{}",
                l.op.name(),
                self.rank(l.rank),
                l.extent,
                if l.checks.is_empty() {
                    String::new()
                } else {
                    format!(" where {}", self.checks(&l.checks))
                }
            )?;
            pad.push_str("  ");
        }
        writeln!(f, "{pad}{} = {}", self.access(&c.out), self.expr(&c.value))
    }

    fn fmt_kernel(&self, f: &mut fmt::Formatter<'_>, k: &PointKernel) -> fmt::Result {
        match k {
            PointKernel::Parallel { name, compute } => {
                writeln!(f, "kernel {name}: parallel")?;
                self.fmt_compute(f, compute, "  ")
            }
            PointKernel::Recurrent {
                name,
                instance,
                rank,
                steps,
                reverse,
                inits,
                body,
            } => {
                let inst: Vec<&str> = instance.iter().map(|&r| self.rank(r)).collect();
                writeln!(
                    f,
                    "kernel {name}: one CTA per ({}), {} steps of {}",
                    inst.join(", "),
                    steps,
                    self.rank(*rank)
                )?;
                for c in inits {
                    self.fmt_compute(f, c, "  init ")?;
                }
                if *reverse {
                    writeln!(
                        f,
                        "  for {} from {} down to 0:",
                        self.rank(*rank),
                        steps.saturating_sub(1)
                    )?;
                } else {
                    writeln!(f, "  for {} < {}:", self.rank(*rank), steps)?;
                }
                for c in body {
                    self.fmt_compute(f, c, "    ")?;
                    writeln!(f, "    barrier")?;
                }
                Ok(())
            }
            PointKernel::Copy { name, from, to } => writeln!(
                f,
                "kernel {name}: {} = {} (absent as 0)",
                self.slots[*to].name, self.slots[*from].name
            ),
        }
    }
}
