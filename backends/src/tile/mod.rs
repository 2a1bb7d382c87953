//! The Tile IR: a small structured program over shared-memory and register tiles that one
//! CTA (thread block) runs, plus its CPU interpreter ([`interp`]).
//!
//! # Model
//!
//! A [`TileProgram`] is run once per *grid cell* `(query tile, batch, head)`. Its rows are
//! the query positions `p0 .. p0 + block_m` of that cell. Objects:
//!
//! * **Global tensors** ([`TensorParam`]): `[B, N, H, d]` with run-time element strides
//!   (`d` contiguous), so BNHD and BHND both work. A tensor's rows run along the query rank
//!   (Q, O) or the key rank (K, V); key-rank tensors are indexed by the KV head
//!   `h / kv_group` (grouped-query attention).
//! * **Row outputs** ([`RowOutput`]): one f32 per (batch, head, query), contiguous `[B, H, N_q]`
//!   (the log-sum-exp).
//! * **Scalar parameters** (f32 by value) and **head parameters** (an f32 array indexed by
//!   head, e.g. ALiBi slopes).
//! * **Shared tiles** ([`SharedTile`]): `rows x head_dim` 16-bit tiles filled from a global
//!   tensor by [`Stmt::LoadTile`]; rows past the sequence end read as zero.
//! * **Register tiles** ([`RegTile`]): `block_m x cols`, either f32 accumulators (the mma
//!   C/D fragment layout) or 16-bit A-operand fragments. Their columns run along the key
//!   rank (scores) or the head dimension (outputs).
//! * **Row vectors** ([`RowVec`]): one f32 per query row (running max, running sum, ...).
//!
//! Statements ([`Stmt`]) are straight-line except for one [`Stmt::KeyLoop`], the iterative
//! rank: it walks the key tiles `[t_begin, t_end)` that the masks leave non-empty (tile
//! skipping), streams its `LoadTile`s through a multi-stage shared-memory ring, and applies
//! [`Stmt::Mask`] only on tiles that the masks or the ragged key tail cut ("boundary" tiles);
//! interior tiles skip the mask entirely. Tiles declared outside the loop and written inside
//! it are the loop-carried state.
//!
//! Element-wise work is expressed with [`ScalarExpr`], a general scalar expression tree
//! (`+ - * /`, `exp exp2 log log2 sqrt tanh neg recip`, `max min`, comparisons with select,
//! literals, parameters, rank indices as values), so a scheduler can lower any cascade's map
//! operators into it.
//!
//! The attention program of FuseMax's 1-pass cascade is built by [`crate::family::softmax::flash_attention`].

pub mod interp;
mod print;
mod validate;

/// Storage element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    Bf16,
    F16,
    F32,
}

impl Elem {
    pub fn bytes(self) -> u32 {
        match self {
            Elem::Bf16 | Elem::F16 => 2,
            Elem::F32 => 4,
        }
    }
    /// Rounds an f64 to this type (round to nearest even), returned as f64.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Elem::Bf16 => half::bf16::from_f64(x).to_f64(),
            Elem::F16 => half::f16::from_f64(x).to_f64(),
            Elem::F32 => x as f32 as f64,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
            Elem::F32 => "f32",
        }
    }
}

/// Which sequence rank a tensor's rows (or a tile's columns) run along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeqRank {
    /// Query position `p`.
    Query,
    /// Key position `m`.
    Key,
}

macro_rules! id_type {
    ($name:ident) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u32);
        impl $name {
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }
    };
}
id_type!(TensorId);
id_type!(RowOutputId);
id_type!(ScalarId);
id_type!(HeadParamId);
id_type!(SharedId);
id_type!(RegId);
id_type!(RowId);
id_type!(StateId);
id_type!(TokenId);
id_type!(RowInputId);

#[derive(Debug, Clone, PartialEq)]
pub struct TensorParam {
    pub name: String,
    pub elem: Elem,
    pub rows: SeqRank,
    pub head_dim: u32,
    pub is_output: bool,
}

/// A per-token f32 input `[B, N, H]` with run-time element strides (a cumulative log-gate).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenParam {
    pub name: String,
    /// The token count of an input read at a distance ([`TokenAt::QueryMinusKey`], a
    /// table over `p - m`), into which those reads are clamped; `None`: a sequence's
    /// (`N_q` or `N_k`).
    pub extent: Option<u32>,
}

/// A mask that compares per-token values (a document mask: `SEG[b, p] == SEG[b, m]`): the
/// pair (p, m) is kept where `lhs op rhs`, each side a per-token f32 input read at the
/// query position (`TokenAt::Row`) or at the key position (`TokenAt::Col`). `Mask`
/// applies it with the band masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueMask {
    pub lhs: (TokenId, TokenAt),
    pub op: CmpOp,
    pub rhs: (TokenId, TokenAt),
}

impl ValueMask {
    /// Whether the pair (p, m) is kept, given each token input's value at a position.
    pub fn keeps(&self, value: impl Fn(TokenId, TokenAt) -> f64) -> bool {
        self.op
            .holds(value(self.lhs.0, self.lhs.1), value(self.rhs.0, self.rhs.1))
    }
}

/// An equality of per-token values, the query row's `query` token against the key's `key`
/// token ([`TileProgram::key_narrowing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenMatch {
    pub query: TokenId,
    pub key: TokenId,
}

/// Which token of a sequential program's current tile a [`ScalarExpr::Token`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenAt {
    /// The element's row (query) token.
    Row,
    /// The element's column (key) token; in `ContractT` scales, the contracted token.
    Col,
    /// The tile's last valid token.
    Last,
    /// The token before the tile (the value is 0 before the first token).
    Before,
    /// The token at `p - m + c` for the element's query position `p` and key position `m`
    /// (a relative-position bias table); reads outside the table's extent are clamped into
    /// it (their elements are masked). Query-tiled programs only.
    QueryMinusKey(i64),
    /// The token at `m - p + c`.
    KeyMinusQuery(i64),
}

impl TokenAt {
    /// The position a distance read reads, for query position `p` and key position `m`.
    pub fn distance(self, p: i64, m: i64) -> Option<i64> {
        match self {
            TokenAt::QueryMinusKey(c) => Some(p - m + c),
            TokenAt::KeyMinusQuery(c) => Some(m - p + c),
            _ => None,
        }
    }
}

/// A global f32 array of per-chunk states of a chunked sequential program:
/// `[chunks, B, H, block_m, cols]`, row-major (a CTA's column block covers its columns).
/// Chunk-major, so the all-gather of per-device states under LASP-2 is this array as is.
#[derive(Debug, Clone, PartialEq)]
pub struct StateParam {
    pub name: String,
    pub cols: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RowOutput {
    pub name: String,
}

/// An f32 row array another program wrote with [`TileProgram::key_splits`] CTAs per query
/// tile: `[splits, B, H, N_q]`, read by [`Stmt::LoadRow`] (the partial statistics a merge
/// program combines).
#[derive(Debug, Clone, PartialEq)]
pub struct RowInput {
    pub name: String,
    pub splits: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScalarParam {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeadParam {
    pub name: String,
}

/// A shared-memory tile of `rows x cols` 16-bit elements, rows along `rank`.
/// Stored row-major with 16-byte chunks XOR-swizzled by `row % 8` (see `ptx` docs).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedTile {
    pub name: String,
    pub rows: u32,
    pub cols: u32,
    pub elem: Elem,
    pub rank: SeqRank,
}

/// What a register tile's columns index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColRank {
    /// Columns are key positions of the current key tile (scores, probabilities).
    Key,
    /// Columns are the head dimension (outputs, Q fragments).
    HeadDim,
}

/// Register tile role: an f32 accumulator (mma C/D layout) or 16-bit mma A-operand fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegKind {
    Accumulator,
    AOperand(Elem),
}

/// A register tile of `block_m x cols`, distributed over the CTA's warps by rows.
#[derive(Debug, Clone, PartialEq)]
pub struct RegTile {
    pub name: String,
    pub cols: u32,
    pub col_rank: ColRank,
    pub kind: RegKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RowVec {
    pub name: String,
}

/// Unary scalar operators.
///
/// These are not the Cascade IR's operators (`einattn_ir::cascade::UnaryOp`, `BinaryOp`,
/// `CmpOp`), on purpose: the Tile IR names what the hardware computes. It has `exp2`,
/// `log2` and `recip` (the SFU instructions a lowering rewrites `exp`, `log` and division
/// into, with the scale folded into the logits), and its comparisons only feed
/// [`ScalarExpr::Select`] (a predicate), where the language's comparisons are values (1 or
/// 0) over `f64` that any map may use. A recognizer translates between the two once
/// (`family::softmax::recognize`), so each IR keeps the operators its interpreter and
/// printer can state exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Exp2,
    Log,
    Log2,
    Sqrt,
    Tanh,
    Recip,
}

/// Binary scalar operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

/// Comparisons (ordered; a NaN operand compares false).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl UnaryOp {
    pub fn apply(self, a: f64) -> f64 {
        match self {
            UnaryOp::Neg => -a,
            UnaryOp::Exp => a.exp(),
            UnaryOp::Exp2 => a.exp2(),
            UnaryOp::Log => a.ln(),
            UnaryOp::Log2 => a.log2(),
            UnaryOp::Sqrt => a.sqrt(),
            UnaryOp::Tanh => a.tanh(),
            UnaryOp::Recip => 1.0 / a,
        }
    }
}

impl BinaryOp {
    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
        }
    }
}

impl CmpOp {
    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }
}

/// A scalar expression evaluated per element (in [`Stmt::Map`]) or per row
/// (in [`Stmt::RowMap`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ScalarExpr {
    Lit(f64),
    /// An f32 kernel parameter.
    Scalar(ScalarId),
    /// The current head's entry of a per-head f32 array.
    Head(HeadParamId),
    /// The absolute index of the current row (query position `p`) or column (key position
    /// `m`, only in maps over key-indexed tiles), as a float.
    Index(SeqRank),
    /// The element of a register f32 tile at the current (row, col).
    Elem(RegId),
    /// A row vector's value at the current row.
    Row(RowId),
    /// A per-token input at a token of the current tile (sequential programs).
    Token(TokenId, TokenAt),
    Unary(UnaryOp, Box<ScalarExpr>),
    Binary(BinaryOp, Box<ScalarExpr>, Box<ScalarExpr>),
    /// `if lhs op rhs { then } else { otherwise }`.
    Select {
        op: CmpOp,
        lhs: Box<ScalarExpr>,
        rhs: Box<ScalarExpr>,
        then: Box<ScalarExpr>,
        otherwise: Box<ScalarExpr>,
    },
}

/// Terse constructors for [`ScalarExpr`], so lowering code reads like the formula.
pub mod ex {
    use super::*;
    pub fn lit(x: f64) -> ScalarExpr {
        ScalarExpr::Lit(x)
    }
    pub fn scalar(id: ScalarId) -> ScalarExpr {
        ScalarExpr::Scalar(id)
    }
    pub fn head(id: HeadParamId) -> ScalarExpr {
        ScalarExpr::Head(id)
    }
    pub fn index(r: SeqRank) -> ScalarExpr {
        ScalarExpr::Index(r)
    }
    pub fn elem(id: RegId) -> ScalarExpr {
        ScalarExpr::Elem(id)
    }
    pub fn row(id: RowId) -> ScalarExpr {
        ScalarExpr::Row(id)
    }
    pub fn un(op: UnaryOp, a: ScalarExpr) -> ScalarExpr {
        ScalarExpr::Unary(op, Box::new(a))
    }
    pub fn bin(op: BinaryOp, a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        ScalarExpr::Binary(op, Box::new(a), Box::new(b))
    }
    pub fn add(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        bin(BinaryOp::Add, a, b)
    }
    pub fn sub(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        bin(BinaryOp::Sub, a, b)
    }
    pub fn mul(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        bin(BinaryOp::Mul, a, b)
    }
    pub fn div(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        bin(BinaryOp::Div, a, b)
    }
    pub fn max(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        bin(BinaryOp::Max, a, b)
    }
    pub fn min(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
        bin(BinaryOp::Min, a, b)
    }
    pub fn exp2(a: ScalarExpr) -> ScalarExpr {
        un(UnaryOp::Exp2, a)
    }
    pub fn log2(a: ScalarExpr) -> ScalarExpr {
        un(UnaryOp::Log2, a)
    }
    pub fn tanh(a: ScalarExpr) -> ScalarExpr {
        un(UnaryOp::Tanh, a)
    }
    pub fn recip(a: ScalarExpr) -> ScalarExpr {
        un(UnaryOp::Recip, a)
    }
    pub fn select(
        op: CmpOp,
        lhs: ScalarExpr,
        rhs: ScalarExpr,
        then: ScalarExpr,
        otherwise: ScalarExpr,
    ) -> ScalarExpr {
        ScalarExpr::Select {
            op,
            lhs: Box::new(lhs),
            rhs: Box::new(rhs),
            then: Box::new(then),
            otherwise: Box::new(otherwise),
        }
    }
}

impl ScalarExpr {
    /// Calls `f` on every node, children first.
    pub fn visit(&self, f: &mut impl FnMut(&ScalarExpr)) {
        match self {
            ScalarExpr::Unary(_, a) => a.visit(f),
            ScalarExpr::Binary(_, a, b) => {
                a.visit(f);
                b.visit(f);
            }
            ScalarExpr::Select {
                lhs,
                rhs,
                then,
                otherwise,
                ..
            } => {
                lhs.visit(f);
                rhs.visit(f);
                then.visit(f);
                otherwise.visit(f);
            }
            _ => {}
        }
        f(self)
    }

    /// The node with `f` applied to each of its children (a leaf as it is): the step of a
    /// rewrite that recurses through `f`.
    pub fn map_children(&self, f: &mut impl FnMut(&ScalarExpr) -> ScalarExpr) -> ScalarExpr {
        match self {
            ScalarExpr::Unary(op, a) => ScalarExpr::Unary(*op, Box::new(f(a))),
            ScalarExpr::Binary(op, a, b) => ScalarExpr::Binary(*op, Box::new(f(a)), Box::new(f(b))),
            ScalarExpr::Select {
                op,
                lhs,
                rhs,
                then,
                otherwise,
            } => ScalarExpr::Select {
                op: *op,
                lhs: Box::new(f(lhs)),
                rhs: Box::new(f(rhs)),
                then: Box::new(f(then)),
                otherwise: Box::new(f(otherwise)),
            },
            leaf => leaf.clone(),
        }
    }

    /// Evaluates the tree in f64, asking `leaf` for every leaf (literals, parameters,
    /// indices, tile elements, rows, tokens) and applying the operators itself.
    pub fn eval<E>(&self, leaf: &mut impl FnMut(&ScalarExpr) -> Result<f64, E>) -> Result<f64, E> {
        Ok(match self {
            ScalarExpr::Unary(op, a) => op.apply(a.eval(leaf)?),
            ScalarExpr::Binary(op, a, b) => op.apply(a.eval(leaf)?, b.eval(leaf)?),
            ScalarExpr::Select {
                op,
                lhs,
                rhs,
                then,
                otherwise,
            } => {
                if op.holds(lhs.eval(leaf)?, rhs.eval(leaf)?) {
                    then.eval(leaf)?
                } else {
                    otherwise.eval(leaf)?
                }
            }
            other => leaf(other)?,
        })
    }

    /// True when the value is the same for every element and row of a CTA
    /// (only literals and parameters): such subtrees are computed once per kernel.
    /// How a position-only expression (no tile elements, row vectors or token inputs)
    /// depends on the element's positions; `None` for any other expression or a uniform one.
    pub fn position_dependence(&self) -> Option<PositionDependence> {
        // (query free, key free, uses query - key)
        fn walk(e: &ScalarExpr, ok: &mut bool) -> (bool, bool, bool) {
            match e {
                ScalarExpr::Binary(BinaryOp::Sub, a, b)
                    if matches!(
                        (a.as_ref(), b.as_ref()),
                        (
                            ScalarExpr::Index(SeqRank::Query),
                            ScalarExpr::Index(SeqRank::Key)
                        )
                    ) =>
                {
                    (false, false, true)
                }
                ScalarExpr::Index(SeqRank::Query) => (true, false, false),
                ScalarExpr::Index(SeqRank::Key) => (false, true, false),
                ScalarExpr::Elem(_) | ScalarExpr::Row(_) | ScalarExpr::Token(..) => {
                    *ok = false;
                    (false, false, false)
                }
                ScalarExpr::Unary(_, a) => walk(a, ok),
                ScalarExpr::Binary(_, a, b) => {
                    let (x, y) = (walk(a, ok), walk(b, ok));
                    (x.0 || y.0, x.1 || y.1, x.2 || y.2)
                }
                ScalarExpr::Select {
                    lhs,
                    rhs,
                    then,
                    otherwise,
                    ..
                } => [lhs, rhs, then, otherwise]
                    .iter()
                    .fold((false, false, false), |acc, x| {
                        let y = walk(x, ok);
                        (acc.0 || y.0, acc.1 || y.1, acc.2 || y.2)
                    }),
                _ => (false, false, false),
            }
        }
        let mut ok = true;
        let (q, k, diff) = walk(self, &mut ok);
        if !ok {
            return None;
        }
        Some(match (q, k, diff) {
            (false, false, false) => return None,
            (false, false, true) => PositionDependence::Difference,
            (true, false, false) => PositionDependence::Query,
            (false, true, false) => PositionDependence::Key,
            _ => PositionDependence::Both,
        })
    }

    /// Whether the expression evaluates a special function (`exp`, `log`, `sqrt`, ...),
    /// i.e. is worth computing once instead of per use.
    pub fn has_transcendental(&self) -> bool {
        let mut found = false;
        self.visit(&mut |e| {
            if let ScalarExpr::Unary(op, _) = e {
                if !matches!(op, UnaryOp::Neg) {
                    found = true;
                }
            }
        });
        found
    }

    pub fn is_uniform(&self) -> bool {
        let mut uniform = true;
        self.visit(&mut |e| {
            if matches!(
                e,
                ScalarExpr::Index(_)
                    | ScalarExpr::Elem(_)
                    | ScalarExpr::Row(_)
                    | ScalarExpr::Token(..)
            ) {
                uniform = false
            }
        });
        uniform
    }
}

/// Through what a position-only expression depends on an element's query position `i`
/// and key position `j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PositionDependence {
    Query,
    Key,
    /// Only through `i - j` (a decay between two positions).
    Difference,
    Both,
}

/// A band constraint `sign * (m - p) <= bound` between key position `m` and query
/// position `p`; keys outside are masked.
/// `KeyMinusQuery, 0` is causal (`m <= p`); `QueryMinusKey, W-1` is a sliding window
/// (`p - m < W`). Both let whole key tiles be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandMask {
    pub direction: BandDirection,
    pub bound: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BandDirection {
    /// `m - p <= bound`
    KeyMinusQuery,
    /// `p - m <= bound`
    QueryMinusKey,
}

impl BandMask {
    pub fn causal() -> BandMask {
        BandMask {
            direction: BandDirection::KeyMinusQuery,
            bound: 0,
        }
    }
    /// Keys with `p - m < window` (a window of `window` keys ending at the query).
    pub fn window(window: u32) -> BandMask {
        BandMask {
            direction: BandDirection::QueryMinusKey,
            bound: window as i64 - 1,
        }
    }
    pub fn allows(&self, p: i64, m: i64) -> bool {
        match self.direction {
            BandDirection::KeyMinusQuery => m - p <= self.bound,
            BandDirection::QueryMinusKey => p - m <= self.bound,
        }
    }
}

/// Row reductions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Max,
    Sum,
}

/// The A operand of a contraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AOperand {
    /// A shared tile with rows along the query rank (`block_m` rows).
    Shared(SharedId),
    /// 16-bit A-fragment register tile.
    Reg(RegId),
}

/// How the B operand's shared tile is laid out relative to the contraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BLayout {
    /// The tile's rows are the output columns `n`, its columns the contracted `k`
    /// (`acc += A * tile^T`, e.g. `S = Q K^T` with K stored `[key][d]`).
    RowsAreN,
    /// The tile's rows are the contracted `k`, its columns the output columns `n`
    /// (`acc += A * tile`, e.g. `O += P V` with V stored `[key][d]`).
    RowsAreK,
}

/// One statement of a tile program.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    /// Copy the rows of the current query tile (outside the key loop) or key tile (inside
    /// it) of `src` into `dst`; rows past the sequence end become zero.
    LoadTile { dst: SharedId, src: TensorId },
    /// Set every element of a register f32 tile.
    Fill { dst: RegId, value: f64 },
    /// Set every row of a row vector.
    FillRow { dst: RowId, value: f64 },
    /// Read a query-rank shared tile into 16-bit A fragments (operands kept in registers).
    Fragments { dst: RegId, src: SharedId },
    /// `acc[r][n] += sum_k A[r][k] * B[k][n]` with bf16/f16 products accumulated in f32.
    Contract {
        acc: RegId,
        a: AOperand,
        b: SharedId,
        b_layout: BLayout,
    },
    /// `dst[r][c] = expr` for every element (expr may read `Elem` of same-shape tiles).
    Map { dst: RegId, expr: ScalarExpr },
    /// Inside the key loop: on boundary tiles, set elements whose key is past `N_k` or
    /// outside a band mask to `fill`; interior tiles are left alone.
    Mask { dst: RegId, fill: f64 },
    /// `dst[r] = reduce over c of src[r][c]`.
    RowReduce {
        dst: RowId,
        src: RegId,
        op: ReduceOp,
    },
    /// `dst[r] = reduce over c of expr[r][c]`, the elements a boundary tile's masks hide
    /// counted as `mask_fill` when it is given: `Map`, `Mask` and `RowReduce` of a tile that
    /// nobody reads again, without the tile. `shape` is a tile of the elements' shape (one
    /// `expr` reads). No register tile holds the map, so a wide tile's statistics cost no
    /// second tile of registers (the row statistics of a projection).
    RowReduceMap {
        dst: RowId,
        op: ReduceOp,
        expr: ScalarExpr,
        shape: RegId,
        mask_fill: Option<f64>,
    },
    /// `dst[r] = expr` for every row (expr may read rows and the query index).
    RowMap { dst: RowId, expr: ScalarExpr },
    /// `dst[r] = sum over c of a[r][c] * b[r][c]` in f32, for two 16-bit A-fragment tiles
    /// of one shape (the per-row `rowsum(dO * O)` of the attention backward): both tiles
    /// hold the same elements in the same registers, so no data moves between threads
    /// except the reduction of a row's four threads.
    RowDot { dst: RowId, a: RegId, b: RegId },
    /// Round an f32 accumulator (columns along keys) into 16-bit A fragments.
    Convert { dst: RegId, src: RegId },
    /// Inside the key loop: `acc[r][n] += sum_k a[row r][k] * b[key n][k]` over the whole
    /// contracted dimension (`head_dim`) of two global tensors, the query tile's rows of `a`
    /// and the key tile's rows of `b`: the GEMM of a contraction too long for shared memory.
    /// It is streamed in slices of `a_tile.cols` columns through a `stages`-deep ring of
    /// the shared tiles `a_tile` (`block_m` rows) and `b_tile` (`block_n` rows); rows past
    /// the sequence ends read as zero. Products are 16-bit, sums f32, as in `Contract`.
    ContractStream {
        acc: RegId,
        a: TensorId,
        b: TensorId,
        a_tile: SharedId,
        b_tile: SharedId,
    },
    /// The iterative key rank: loop over key tiles of `block_n` keys.
    KeyLoop {
        block_n: u32,
        masks: Vec<BandMask>,
        body: Vec<Stmt>,
    },
    /// Write the rows `< N_q` of an f32 tile (head-dim columns) to a query-rank tensor. In
    /// a program with [`TileProgram::key_splits`] > 1 the tensor is f32 and holds one copy
    /// per split, stacked along the batch rank: the CTA of split `s` writes batch `s B + b`.
    Store { src: RegId, dst: TensorId },
    /// `acc[r][n] += weight[r] * src[split][r][n]`: add copy `split` of an f32 query-rank
    /// tensor that a split program stored (batch `split B + b`), weighed per row, to an f32
    /// tile of head-dim columns; rows past `N_q` add nothing. Outside the key loop of a
    /// program that is not sequential (the merge of a split key loop). One statement, not a
    /// load and a map: the copy never needs a tile of registers of its own (at a head dim of
    /// 256 two such tiles spill).
    AccumulatePartial {
        acc: RegId,
        src: TensorId,
        split: u32,
        weight: RowId,
    },
    /// Write the rows `< N_q` of a row vector to a row output (at `[split, B, H, N_q]` in a
    /// program with [`TileProgram::key_splits`] > 1: the CTA's split of the key loop).
    StoreRow { src: RowId, dst: RowOutputId },
    /// Read split `split` of a row input into a row vector (rows past `N_q` read 0).
    LoadRow {
        dst: RowId,
        src: RowInputId,
        split: u32,
    },
    /// `acc[r][n] += sum_k round(scale(k) * a[k][r]) * b[k][n]`: the A operand is the
    /// transpose of shared tile `a` (rows `k`, columns the accumulator's rows), each
    /// contracted row scaled by `scale` (an expression of `Index(Key)` = `k` and uniform
    /// values) before rounding to 16 bits; `b` is laid out `RowsAreK`. The state update
    /// `S += K^T diag(decay) V` of linear attention.
    ContractT {
        acc: RegId,
        a: SharedId,
        scale: ScalarExpr,
        b: SharedId,
    },
    /// Write an f32 tile (`block_m x cols`) as this CTA's chunk of a state array.
    StoreState { src: RegId, dst: StateId },
    /// `dst = sum over chunks c' < c of decay^(c - 1 - c') * src[c']` (Horner's rule over
    /// the earlier chunks' states; `decay` is uniform): the state entering chunk `c`.
    LoadStatePrefix {
        dst: RegId,
        src: StateId,
        decay: ScalarExpr,
    },
    /// Round an f32 tile (`block_m x cols`) to 16 bits into a shared tile of the same shape,
    /// for a contraction to read. A tile read only as a contraction's A operand (the
    /// probabilities of `P V`) is [row-private](TileProgram::row_private_tiles): the rows a
    /// warp writes are the rows it reads, so only the warp (with `wgmma`, its warpgroup)
    /// meets before the read. Any other tile is a state every warp reads (linear
    /// attention's): the write waits for every warp first, and inside the key loop the
    /// lowering double-buffers it.
    StoreShared { src: RegId, dst: SharedId },
    /// The decoupled look-back of a [`TileProgram::look_back`] program: publish `state`
    /// (this chunk's own state) as `aggregates[chunk]`; `prefix = sum over c < chunk of
    /// decay^(chunk - 1 - c) * state_c`, gathered by walking back over the earlier chunks
    /// until one has published its inclusive state (their aggregates before it); publish
    /// `inclusive[chunk] = decay * prefix + state`; then `state = prefix`. `decay` is
    /// uniform (one chunk's decay).
    LookBack {
        state: RegId,
        prefix: RegId,
        aggregates: StateId,
        inclusive: StateId,
        decay: ScalarExpr,
    },
}

/// Launch-shape knobs fixed at lowering time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileSchedule {
    /// Query rows per CTA.
    pub block_m: u32,
    /// Warps per CTA; each owns `block_m / warps` consecutive rows (a multiple of 16).
    pub warps: u32,
    /// Shared-memory stages of the key loop's streamed tiles (>= 2).
    pub stages: u32,
    /// Lowering hint: skip `acc = acc * row` when every row factor of a warp is exactly 1
    /// (a warp vote); helps when registers are tight, costs a branch otherwise.
    pub skip_unit_rescale: bool,
    /// Which tensor-core instructions carry the contractions.
    pub mma: MmaUnit,
    /// Who copies the shared tiles from global memory.
    pub loads: Loads,
    /// A persistent grid of at most this many CTAs (one per SM), each looping over work
    /// tiles `ctaid.x, ctaid.x + nctaid.x, ...` of the `ceil(N_q / block_m) * B * H`
    /// (query tile, batch, head) tiles, instead of one CTA per tile: a CTA's barriers,
    /// setup and pipeline fill are paid once, and its producer loads the next tile's query
    /// rows while the consumers finish the current one. With masks the query tiles with
    /// the most key tiles come first. `None`: one CTA per work tile. Warp-specialized
    /// programs only (see [`TileProgram::persistent_ctas`]).
    pub persistent: Option<u32>,
    /// The output tile leaves through shared memory by the copy engine: each consumer
    /// warpgroup writes its 64 rows into the rows of the query tile it alone read (dead once
    /// its key loop is over), and one of its threads stores them with
    /// `cp.async.bulk.tensor` through a tensor map of the output (boxes of 64 rows). Needs
    /// the copy-engine producer, one CTA per work tile, a 16-bit output no wider than Q.
    pub store_tma: bool,
    /// In a warp-specialized key loop, the wait for the previous key tile's deferred
    /// contraction stays where the program puts it (after the softmax it overlaps): a
    /// CTA-scope fence before it stops ptxas from scheduling the wait, which reads no
    /// register, at the top of its basic block, where it would serialize the softmax
    /// after the contraction (seen in the SASS of every deferred kernel, CUDA 13.0).
    pub pin_deferred_wait: bool,
}

/// Who issues a program's tile loads (`LoadTile`), and how the threads that read a tile
/// learn that it has landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Loads {
    /// Every thread copies its share with `cp.async`; a CTA-wide barrier at the top of each
    /// key tile publishes the stage and frees the one the previous tile read.
    #[default]
    Cooperative,
    /// Warp specialization: one more warpgroup, the producer, only copies tiles (with its
    /// registers lowered by `setmaxnreg`); the `warps` consumer warps only compute (with
    /// theirs raised). Each stage of the ring has an mbarrier per streamed tile that the
    /// producer arrives on when the tile has landed, and one that the consumer warps arrive
    /// on when they are done reading the stage, so no barrier spans the whole CTA and the
    /// producer runs as far ahead as the ring allows. Needs `wgmma` (sm_90a). With
    /// `pingpong`, consumer warpgroups issue their contractions in turn (see the PTX
    /// printer's `producer.rs`). With `tma`, one producer thread copies each tile with the
    /// copy engine (`cp.async.bulk.tensor`, one instruction per 64-column block, through a
    /// tensor-map parameter per loaded tensor) instead of 128 threads issuing `cp.async`.
    ProducerWarpgroup { pingpong: bool, tma: bool },
}

impl Loads {
    pub fn specialized(self) -> bool {
        matches!(self, Loads::ProducerWarpgroup { .. })
    }

    /// Threads a CTA has besides the compute warps: the producer warpgroup, if any.
    pub fn producer_threads(self) -> u32 {
        if self.specialized() {
            PRODUCER_THREADS
        } else {
            0
        }
    }

    /// Whether tiles are copied by the copy engine through tensor maps.
    pub fn tma(self) -> bool {
        matches!(self, Loads::ProducerWarpgroup { tma: true, .. })
    }

    pub fn name(self) -> &'static str {
        match self {
            Loads::Cooperative => "cooperative",
            Loads::ProducerWarpgroup { pingpong, tma } => match (pingpong, tma) {
                (false, false) => "producer",
                (true, false) => "pingpong",
                (false, true) => "producer-tma",
                (true, true) => "pingpong-tma",
            },
        }
    }

    /// Every value, for parsers of the names.
    pub const ALL: [Loads; 5] = [
        Loads::Cooperative,
        Loads::ProducerWarpgroup {
            pingpong: false,
            tma: false,
        },
        Loads::ProducerWarpgroup {
            pingpong: true,
            tma: false,
        },
        Loads::ProducerWarpgroup {
            pingpong: false,
            tma: true,
        },
        Loads::ProducerWarpgroup {
            pingpong: true,
            tma: true,
        },
    ];

    pub fn from_name(name: &str) -> Option<Loads> {
        Loads::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// Bytes of one row of a copy-engine box: the width of the 128-byte swizzle, so one copy
/// fills one 64-column block of a shared tile.
pub const TMA_BOX_BYTES: u32 = 128;

/// Rows of a box of the output the copy engine stores ([`TileSchedule::store_tma`]): one
/// consumer warpgroup's.
pub const STORE_BOX_ROWS: u32 = 64;

/// Threads of the producer warpgroup of a [`Loads::ProducerWarpgroup`] program.
pub const PRODUCER_THREADS: u32 = 128;

/// Registers per thread the producer warpgroup keeps (`setmaxnreg.dec`): its copies'
/// addresses and counters. With `cp.async` every producer thread computes its own copies'
/// addresses (at 40, ptxas spilled the producer of 128-row key tiles); with the copy
/// engine one thread issues a few instructions per tile, and 24 (the least `setmaxnreg`
/// takes; FlashAttention-3's) leaves the consumers 16 more each with two warpgroups, 8
/// more with three.
pub fn producer_registers(loads: Loads) -> u32 {
    if loads.tma() {
        24
    } else {
        56
    }
}

/// Registers per thread the consumers of a warp-specialized CTA get (`setmaxnreg.inc`):
/// the register file of the SM (one CTA per SM) less the producer's, in multiples of 8.
pub fn consumer_registers(consumer_threads: u32, loads: Loads) -> u32 {
    let left = 65536 - PRODUCER_THREADS * producer_registers(loads);
    (left / consumer_threads.max(1) / 8 * 8).min(248)
}

/// The tensor-core instructions a lowering uses for `Contract` and `ContractT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MmaUnit {
    /// `mma.sync` per warp (sm_80 and later): B operands go through registers via `ldmatrix`.
    #[default]
    Sync,
    /// `wgmma.mma_async` per warpgroup of 4 warps (sm_90a): B (and a shared A) operands are
    /// read from shared memory through descriptors, so no B fragment ever occupies a
    /// register. Needs 16 rows per warp and whole warpgroups.
    Warpgroup,
}

impl MmaUnit {
    pub fn name(self) -> &'static str {
        match self {
            MmaUnit::Sync => "mma.sync",
            MmaUnit::Warpgroup => "wgmma",
        }
    }
}

/// Dynamic shared memory one CTA may use on sm_80 through sm_90 (227 KB).
pub const MAX_SHARED_BYTES: u32 = 232_448;

/// A tile program: one CTA's work for one (query tile, batch, head), or, when
/// `sequential`, for one (column block, batch, head).
#[derive(Debug, Clone, PartialEq)]
pub struct TileProgram {
    pub name: String,
    pub schedule: TileSchedule,
    /// A recurrence over the whole sequence (linear attention): one CTA walks every tile
    /// of the key loop in order and its rows are the current tile's positions. Loads and
    /// stores inside the loop address the current tile of any tensor (`N_q == N_k`), and
    /// `Index(Query)`/`Index(Key)` are the row and column *within the tile*. The key
    /// loop's tile equals `block_m` and has no masks.
    pub sequential: bool,
    /// Column blocks of a sequential program (grid x): a shared or register tile with
    /// fewer columns than its tensor covers columns `[cb * cols, (cb + 1) * cols)`.
    pub col_blocks: u32,
    /// A sequential program split along the sequence when nonzero: grid z is the chunk,
    /// and the CTA of chunk `c` walks tiles `[c * chunk_tiles, (c + 1) * chunk_tiles)`,
    /// with positions still tile-relative.
    pub chunk_tiles: u32,
    pub states: Vec<StateParam>,
    /// Per-token inputs of a sequential program.
    pub tokens: Vec<TokenParam>,
    /// Query rows sit at positions `q_offset + row` (a launch parameter) in masks and
    /// `Index(Query)`: a device holding a slice of the sequence under sequence parallelism
    /// masks against the keys of the whole sequence. Loads and stores stay local.
    pub query_offset: bool,
    /// A chunked sequential program whose chunks (one tile each) run in parallel and
    /// exchange states through a decoupled look-back ([`Stmt::LookBack`]): a CTA takes a
    /// ticket (chunk-major order, so every earlier chunk's CTA has started) and publishes
    /// its states with flags in a `u32` array of `1 + chunks * B * H * col_blocks` words
    /// (the ticket counter first), which the launcher zeroes before every launch.
    pub look_back: bool,
    /// A sequential program whose loop walks the tiles from the last to the first (the
    /// reverse recurrence of a backward: an adjoint state carried from later tokens to
    /// earlier ones). Positions stay tile-relative; the first tile walked is the ragged
    /// one, whose rows past the end read as zero. Not chunked.
    pub reverse: bool,
    /// A query-tiled program whose key loop is split across this many CTAs (grid z, 1: not
    /// split): the CTA of split `s` walks the `s`-th of `key_splits` equal runs of its
    /// key tiles (the last may be shorter, or empty) and stores its row outputs at
    /// `[s, B, H, N_q]`, partial statistics that a merge program reads as [`RowInput`]s. It
    /// puts a GPU's every SM to work when the query tiles alone are too few (a long key or
    /// vocabulary rank, few rows).
    pub key_splits: u32,
    /// The key loop may skip the keys an equality of per-token values rules out (a
    /// document mask `SEG[p] == SEG[m]`): it walks only the tiles from the first to the
    /// last key, within the band masks, whose `key` token lies between the least and the
    /// greatest `query` token of the CTA's query rows. Keys in between are still masked
    /// per element; tiles outside hold no key the mask keeps.
    pub key_narrowing: Option<TokenMatch>,
    /// Masks on per-token values, applied by `Mask` with the band masks. When the only one
    /// is the narrowing's equality, a CTA whose query rows hold one value and whose
    /// narrowed keys all hold it needs them only on the tiles at the range's two ends.
    pub value_masks: Vec<ValueMask>,
    pub tensors: Vec<TensorParam>,
    pub row_outputs: Vec<RowOutput>,
    pub row_inputs: Vec<RowInput>,
    pub scalars: Vec<ScalarParam>,
    pub head_params: Vec<HeadParam>,
    pub shared: Vec<SharedTile>,
    pub regs: Vec<RegTile>,
    pub rows: Vec<RowVec>,
    pub body: Vec<Stmt>,
}

/// Errors found when checking or lowering a tile program.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TileError {
    #[error("invalid tile program: {0}")]
    Invalid(String),
    #[error("not supported by this lowering: {0}")]
    Unsupported(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, TileError> {
    Err(TileError::Invalid(msg.into()))
}

/// Kernel-parameter kinds of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiKind {
    Ptr,
    U32,
    U64,
    F32,
    /// A 128-byte tensor map passed by value.
    TensorMap,
}

/// What a kernel parameter carries, so a launcher can fill it by meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbiRole {
    TensorPtr(TensorId),
    RowOutputPtr(RowOutputId),
    RowInputPtr(RowInputId),
    HeadParamPtr(HeadParamId),
    StatePtr(StateId),
    /// The global index of the launch's first chunk (a device's rank under LASP-2; 0 on one
    /// device): chunk `chunk_base + ctaid.z` owns state slot and prefix length.
    ChunkBase,
    /// Chunks in the state arrays (all devices' together under LASP-2).
    ChunkTotal,
    /// The position of query row 0 (see [`TileProgram::query_offset`]).
    QueryOffset,
    /// The zeroed ticket counter and state flags of a look-back program.
    LookBackFlags,
    TokenPtr(TokenId),
    TokenStrideBatch(TokenId),
    TokenStrideSeq(TokenId),
    TokenStrideHead(TokenId),
    QueryLen,
    KeyLen,
    Heads,
    /// Query heads per KV head (1 without grouped-query attention).
    KvGroup,
    /// The batch size: a persistent program's work tiles are `ceil(N_q / block_m) * B * H`.
    Batch,
    StrideBatch(TensorId),
    StrideSeq(TensorId),
    StrideHead(TensorId),
    Scalar(ScalarId),
    /// The tensor map the copy engine reads a tensor through, in boxes of `rows` rows and
    /// `cols` columns (128 bytes), its rows along `rank` (a [`Loads::tma`] program's loaded
    /// tensors).
    TensorMap {
        tensor: TensorId,
        rows: u32,
        cols: u32,
        rank: SeqRank,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiParam {
    pub name: String,
    pub kind: AbiKind,
    pub role: AbiRole,
}

impl TileProgram {
    /// Whether the value masks are exactly the narrowing's equality (tiles inside a CTA's
    /// one-valued key range then need no value mask).
    pub fn value_masks_are_the_narrowing(&self) -> bool {
        match (self.key_narrowing, &self.value_masks[..]) {
            (Some(tm), [m]) => {
                let q = (tm.query, TokenAt::Row);
                let k = (tm.key, TokenAt::Col);
                m.op == CmpOp::Eq && ((m.lhs, m.rhs) == (q, k) || (m.lhs, m.rhs) == (k, q))
            }
            _ => false,
        }
    }

    /// A query-tiled program with no parameters, tiles, rows or statements, not split,
    /// chunked or sequential: lowerings start here and set what differs.
    pub fn new(name: String, schedule: TileSchedule) -> TileProgram {
        TileProgram {
            name,
            schedule,
            sequential: false,
            col_blocks: 1,
            chunk_tiles: 0,
            states: vec![],
            tokens: vec![],
            query_offset: false,
            look_back: false,
            reverse: false,
            key_splits: 1,
            key_narrowing: None,
            value_masks: vec![],
            tensors: vec![],
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: vec![],
            head_params: vec![],
            shared: vec![],
            regs: vec![],
            rows: vec![],
            body: vec![],
        }
    }

    pub fn chunked(&self) -> bool {
        self.chunk_tiles > 0
    }
    /// Threads that run the program's statements (the consumers of a warp-specialized
    /// program).
    pub fn threads(&self) -> u32 {
        self.schedule.warps * 32
    }
    /// Threads per CTA at launch: [`TileProgram::threads`] plus a producer warpgroup.
    pub fn launch_threads(&self) -> u32 {
        self.threads() + self.schedule.loads.producer_threads()
    }
    pub fn rows_per_warp(&self) -> u32 {
        self.schedule.block_m / self.schedule.warps
    }
    /// Whether the key loop has band masks (its query tiles then see different numbers of
    /// key tiles, and the longest go first).
    pub fn has_band_masks(&self) -> bool {
        self.body
            .iter()
            .any(|s| matches!(s, Stmt::KeyLoop { masks, .. } if !masks.is_empty()))
    }
    /// The CTA count a persistent grid is capped at (see [`TileSchedule::persistent`]).
    pub fn persistent_ctas(&self) -> Option<u32> {
        self.schedule.persistent
    }

    /// The kernel parameters in declaration order (the PTX `.entry` uses the same order).
    /// Strides are in elements; the row output is `[B, H, N_q]` f32.
    pub fn abi(&self) -> Vec<AbiParam> {
        let mut v = Vec::new();
        let mut push = |name: String, kind, role| v.push(AbiParam { name, kind, role });
        let ptr = AbiKind::Ptr;
        for (i, t) in self.tensors.iter().enumerate() {
            push(t.name.clone(), ptr, AbiRole::TensorPtr(TensorId(i as u32)));
        }
        for (i, r) in self.row_outputs.iter().enumerate() {
            push(
                r.name.clone(),
                ptr,
                AbiRole::RowOutputPtr(RowOutputId(i as u32)),
            );
        }
        for (i, r) in self.row_inputs.iter().enumerate() {
            push(
                r.name.clone(),
                ptr,
                AbiRole::RowInputPtr(RowInputId(i as u32)),
            );
        }
        for (i, h) in self.head_params.iter().enumerate() {
            push(
                h.name.clone(),
                ptr,
                AbiRole::HeadParamPtr(HeadParamId(i as u32)),
            );
        }
        for (i, st) in self.states.iter().enumerate() {
            push(st.name.clone(), ptr, AbiRole::StatePtr(StateId(i as u32)));
        }
        if self.look_back {
            push("look_back_flags".into(), ptr, AbiRole::LookBackFlags);
        }
        for (i, t) in self.tokens.iter().enumerate() {
            let id = TokenId(i as u32);
            push(t.name.clone(), ptr, AbiRole::TokenPtr(id));
            for (suffix, role) in [
                ("sb", AbiRole::TokenStrideBatch(id)),
                ("sn", AbiRole::TokenStrideSeq(id)),
                ("sh", AbiRole::TokenStrideHead(id)),
            ] {
                push(format!("{}_{suffix}", t.name), AbiKind::U64, role);
            }
        }
        let mut sizes = vec![
            ("n_q", AbiRole::QueryLen),
            ("n_k", AbiRole::KeyLen),
            ("heads", AbiRole::Heads),
            ("kv_group", AbiRole::KvGroup),
        ];
        if self.chunked() {
            sizes.push(("chunk_base", AbiRole::ChunkBase));
            sizes.push(("chunk_total", AbiRole::ChunkTotal));
        }
        if self.query_offset {
            sizes.push(("q_offset", AbiRole::QueryOffset));
        }
        if self.schedule.persistent.is_some() {
            sizes.push(("batch", AbiRole::Batch));
        }
        for (name, role) in sizes {
            push(name.into(), AbiKind::U32, role);
        }
        for (i, t) in self.tensors.iter().enumerate() {
            let id = TensorId(i as u32);
            for (suffix, role) in [
                ("sb", AbiRole::StrideBatch(id)),
                ("sn", AbiRole::StrideSeq(id)),
                ("sh", AbiRole::StrideHead(id)),
            ] {
                push(format!("{}_{suffix}", t.name), AbiKind::U64, role);
            }
        }
        for (i, sc) in self.scalars.iter().enumerate() {
            push(
                sc.name.clone(),
                AbiKind::F32,
                AbiRole::Scalar(ScalarId(i as u32)),
            );
        }
        for (tensor, rows) in self.tensor_maps() {
            let t = &self.tensors[tensor.index()];
            push(
                format!("{}_tmap", t.name),
                AbiKind::TensorMap,
                AbiRole::TensorMap {
                    tensor,
                    rows,
                    cols: TMA_BOX_BYTES / t.elem.bytes(),
                    rank: t.rows,
                },
            );
        }
        v
    }

    /// The query tile loaded before the key loop, through which the copy engine stores the
    /// output ([`TileSchedule::store_tma`]).
    pub fn query_staging_tile(&self) -> Option<SharedId> {
        self.body.iter().find_map(|st| match st {
            Stmt::LoadTile { dst, .. } if self.shared[dst.index()].rank == SeqRank::Query => {
                Some(*dst)
            }
            _ => None,
        })
    }

    /// The tensors a [`Loads::tma`] program copies with the copy engine, with the rows of
    /// the tiles they are copied into, in order of first load; then the output, when the
    /// copy engine stores it ([`TileSchedule::store_tma`]), with its box's rows.
    pub fn tensor_maps(&self) -> Vec<(TensorId, u32)> {
        if !self.schedule.loads.tma() {
            return Vec::new();
        }
        let mut maps: Vec<(TensorId, u32)> = Vec::new();
        let mut visit = |st: &Stmt| {
            if let Stmt::LoadTile { dst, src } = st {
                let rows = self.shared[dst.index()].rows;
                if !maps.iter().any(|m| m.0 == *src) {
                    maps.push((*src, rows));
                }
            }
        };
        for s in &self.body {
            visit(s);
            if let Stmt::KeyLoop { body, .. } = s {
                body.iter().for_each(&mut visit);
            }
        }
        // The output the copy engine stores: one box per consumer warpgroup.
        if self.schedule.store_tma {
            for s in &self.body {
                if let Stmt::Store { dst, .. } = s {
                    if !maps.iter().any(|m| m.0 == *dst) {
                        maps.push((*dst, STORE_BOX_ROWS));
                    }
                }
            }
        }
        maps
    }

    /// The key loop's tile size, if the program has a key loop.
    pub fn block_n(&self) -> Option<u32> {
        self.body.iter().find_map(|s| match s {
            Stmt::KeyLoop { block_n, .. } => Some(*block_n),
            _ => None,
        })
    }

    /// Dynamic shared memory in bytes: tiles loaded outside the loop once, streamed tiles
    /// `stages` times.
    pub fn shared_bytes(&self) -> u32 {
        let mut total = 0;
        let streamed = self.streamed_tiles();
        for (i, t) in self.shared.iter().enumerate() {
            let bytes = t.rows * t.cols * t.elem.bytes();
            let copies = if streamed.contains(&SharedId(i as u32)) {
                self.schedule.stages
            } else if self.loop_written_tiles().contains(&SharedId(i as u32)) {
                2
            } else {
                1
            };
            total += bytes * copies;
        }
        total
    }

    /// Shared tiles written by `StoreShared` inside the key loop that are states carried
    /// from one iteration to the next (not row-private), double-buffered by the lowering.
    pub fn loop_written_tiles(&self) -> Vec<SharedId> {
        let private = self.row_private_tiles();
        let mut out = Vec::new();
        for s in &self.body {
            if let Stmt::KeyLoop { body, .. } = s {
                for b in body {
                    if let Stmt::StoreShared { dst, .. } = b {
                        if !out.contains(dst) && !private.contains(dst) {
                            out.push(*dst);
                        }
                    }
                }
            }
        }
        out
    }

    /// Shared tiles that `StoreShared` writes and nothing reads but a `Contract`'s A
    /// operand: each warp (each warpgroup with `wgmma`) reads back only the query rows it
    /// wrote, so no warp waits for another's rows.
    pub fn row_private_tiles(&self) -> Vec<SharedId> {
        fn visit(body: &[Stmt], stored: &mut Vec<SharedId>, shared_otherwise: &mut Vec<SharedId>) {
            for st in body {
                match st {
                    Stmt::StoreShared { dst, .. } => stored.push(*dst),
                    Stmt::Contract { b, .. } => shared_otherwise.push(*b),
                    Stmt::ContractT { a, b, .. } => shared_otherwise.extend([*a, *b]),
                    Stmt::Fragments { src, .. } => shared_otherwise.push(*src),
                    Stmt::LoadTile { dst, .. } => shared_otherwise.push(*dst),
                    Stmt::ContractStream { a_tile, b_tile, .. } => {
                        shared_otherwise.extend([*a_tile, *b_tile])
                    }
                    Stmt::KeyLoop { body, .. } => visit(body, stored, shared_otherwise),
                    _ => {}
                }
            }
        }
        let (mut stored, mut otherwise) = (Vec::new(), Vec::new());
        visit(&self.body, &mut stored, &mut otherwise);
        let mut out: Vec<SharedId> = Vec::new();
        for t in stored {
            if !otherwise.contains(&t) && !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Shared tiles loaded inside the key loop (streamed through the stage ring), and the
    /// slices of a [`Stmt::ContractStream`] (streamed through its own ring).
    pub fn streamed_tiles(&self) -> Vec<SharedId> {
        let mut out = Vec::new();
        for s in &self.body {
            if let Stmt::KeyLoop { body, .. } = s {
                for b in body {
                    match b {
                        Stmt::LoadTile { dst, .. } => out.push(*dst),
                        Stmt::ContractStream { a_tile, b_tile, .. } => {
                            out.extend([*a_tile, *b_tile])
                        }
                        _ => {}
                    }
                }
            }
        }
        out
    }

    /// The key loop's [`Stmt::ContractStream`], if it has one.
    pub fn contract_stream(&self) -> Option<&Stmt> {
        self.body.iter().find_map(|s| match s {
            Stmt::KeyLoop { body, .. } => body
                .iter()
                .find(|b| matches!(b, Stmt::ContractStream { .. })),
            _ => None,
        })
    }
}

/// The key tiles a query tile visits and which of them need the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTileRange {
    pub begin: i64,
    pub end: i64,
}

/// Key tiles `[begin, end)` for the query tile starting at `p0` whose last *valid* row is
/// `p_last` (`min(p0 + block_m, N_q) - 1`): the tiles that hold at least one key that some
/// row of the tile may attend to. This is the tile skipping the PTX lowering performs.
pub fn key_tile_range(
    masks: &[BandMask],
    p0: i64,
    p_last: i64,
    n_k: i64,
    block_n: i64,
) -> KeyTileRange {
    let mut key_start = 0i64;
    let mut key_end = n_k;
    for m in masks {
        match m.direction {
            BandDirection::KeyMinusQuery => key_end = key_end.min(p_last + m.bound + 1),
            BandDirection::QueryMinusKey => key_start = key_start.max(p0 - m.bound),
        }
    }
    if key_end <= key_start {
        return KeyTileRange { begin: 0, end: 0 };
    }
    KeyTileRange {
        begin: key_start.div_euclid(block_n),
        end: (key_end + block_n - 1).div_euclid(block_n),
    }
}

/// Whether key tile `t` needs the mask for query rows `[p0, p_last]`: it crosses the key
/// tail or a band's edge. Interior tiles are fully visible to every row.
pub fn key_tile_needs_mask(
    masks: &[BandMask],
    t: i64,
    p0: i64,
    p_last: i64,
    n_k: i64,
    block_n: i64,
) -> bool {
    let k0 = t * block_n;
    let k1 = k0 + block_n - 1;
    if k1 >= n_k {
        return true;
    }
    masks.iter().any(|m| match m.direction {
        BandDirection::KeyMinusQuery => k1 - p0 > m.bound,
        BandDirection::QueryMinusKey => p_last - k0 > m.bound,
    })
}
