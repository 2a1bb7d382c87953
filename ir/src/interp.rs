//! The reference interpreter: evaluates any valid cascade on the CPU in f64.
//!
//! It is deliberately direct (a loop nest per Einsum, reductions nested innermost first)
//! because it is the ground truth every rewrite, schedule and kernel is compared against.
//! Masked points are *absent*: a reduction skips them, a map over an absent operand is
//! absent, and an absent element of a stored output reads as 0.

use crate::arena::Handle;
use crate::cascade::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// A dense row-major tensor of f64, with an optional presence mask for tensors that have
/// masked (absent) elements.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    /// `None` when every element is present.
    pub present: Option<Vec<bool>>,
}

impl TensorData {
    pub fn new(shape: Vec<usize>, values: Vec<f64>) -> Self {
        TensorData {
            shape,
            values,
            present: None,
        }
    }

    pub fn filled(shape: Vec<usize>, value: f64) -> Self {
        let n = shape.iter().product();
        TensorData::new(shape, vec![value; n])
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn get(&self, offset: usize) -> Option<f64> {
        match &self.present {
            Some(p) if !p[offset] => None,
            _ => Some(self.values[offset]),
        }
    }

    /// Values with absent elements read as 0, as an output is stored.
    pub fn stored(&self) -> std::borrow::Cow<'_, [f64]> {
        match &self.present {
            None => std::borrow::Cow::Borrowed(&self.values),
            Some(p) => self
                .values
                .iter()
                .zip(p)
                .map(|(v, &ok)| if ok { *v } else { 0.0 })
                .collect(),
        }
    }

    /// ‖self − reference‖ / ‖reference‖ over stored values; NaN anywhere gives NaN.
    pub fn relative_error(&self, reference: &TensorData) -> f64 {
        let a = self.stored();
        let b = reference.stored();
        if a.len() != b.len() {
            return f64::NAN;
        }
        let (mut num, mut den) = (0.0, 0.0);
        for (x, y) in a.iter().zip(b.iter()) {
            num += (x - y) * (x - y);
            den += y * y;
        }
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("no value supplied for {kind} `{name}`")]
    MissingInput { name: String, kind: &'static str },
    #[error("`{name}` has shape {got:?}, but the cascade expects {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("`{tensor}` is indexed at {index} along a dimension of extent {extent}")]
    OutOfRange {
        tensor: String,
        index: i64,
        extent: u64,
        span: Span,
    },
    #[error("`{tensor}` is read before any Einsum assigns it")]
    Unassigned { tensor: String, span: Span },
    /// The evaluation would exceed [`Limits`]; nothing was allocated.
    #[error("{0}")]
    TooLarge(Box<Estimate>),
    /// A tensor's storage could not be allocated (or its size overflows the address space).
    #[error("cannot allocate `{tensor}`: {elements} elements do not fit in memory")]
    Allocation { tensor: String, elements: u128 },
}

/// Bounds on what one evaluation may allocate and iterate, checked from the cascade before
/// anything is allocated ([`estimate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Elements of every tensor held at once (inputs, parameters, every Einsum's output).
    pub max_elements: u64,
    /// Points iterated over all Einsums (each point evaluates the expression once).
    pub max_work: u64,
}

impl Default for Limits {
    /// 2^28 elements (2 GiB of f64 values) and 2^33 points (minutes of evaluation): far
    /// above what a reference run needs, far below what exhausts a machine.
    fn default() -> Self {
        Limits {
            max_elements: 1 << 28,
            max_work: 1 << 33,
        }
    }
}

/// What evaluating a cascade allocates and iterates, before doing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Elements of every tensor the evaluation holds (all stay live to the end).
    pub elements: u128,
    /// Points iterated: per Einsum the product of its ranks' extents (and its `init`).
    pub work: u128,
    /// The largest tensor: name, shape, elements.
    pub largest: Option<(String, Vec<u64>, u128)>,
    /// The Einsum iterating the most points: the tensor it writes, points.
    pub busiest: Option<(String, u128)>,
    /// The limits it was checked against.
    pub limits: Limits,
}

impl Estimate {
    pub fn exceeds(&self) -> bool {
        self.elements > u128::from(self.limits.max_elements)
            || self.work > u128::from(self.limits.max_work)
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut over = Vec::new();
        if self.elements > u128::from(self.limits.max_elements) {
            over.push(format!(
                "hold {} tensor elements ({} as f64; the limit is {})",
                self.elements,
                human_bytes(self.elements.saturating_mul(8)),
                self.limits.max_elements
            ));
        }
        if self.work > u128::from(self.limits.max_work) {
            over.push(format!(
                "iterate {} points (the limit is {})",
                self.work, self.limits.max_work
            ));
        }
        if over.is_empty() {
            write!(
                f,
                "the evaluation holds {} elements and iterates {} points, within the limits",
                self.elements, self.work
            )?;
        } else {
            write!(f, "the evaluation would {}", over.join(" and "))?;
        }
        if let Some((name, shape, n)) = &self.largest {
            let s = if *n == 1 { "" } else { "s" };
            write!(
                f,
                "; the largest tensor is `{name}` {shape:?} ({n} element{s})"
            )?;
        }
        if let Some((name, n)) = &self.busiest {
            write!(f, "; the Einsum writing `{name}` iterates {n} points")?;
        }
        Ok(())
    }
}

fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What evaluating `cascade` would allocate and iterate, from extents alone (exact
/// arithmetic: a product past 2^128 saturates, which is past any limit).
pub fn estimate(cascade: &Cascade, limits: Limits) -> Estimate {
    let product = |extents: &mut dyn Iterator<Item = u64>| {
        extents.fold(1u128, |a, e| a.saturating_mul(u128::from(e)))
    };
    let mut elements: u128 = 0;
    let mut largest: Option<(String, Vec<u64>, u128)> = None;
    for (h, t) in cascade.tensors.iter() {
        let shape: Vec<u64> = (0..t.ranks.len())
            .map(|d| cascade.dim_extent(h, d))
            .collect();
        let n = product(&mut shape.iter().copied());
        elements = elements.saturating_add(n);
        if largest.as_ref().is_none_or(|(_, _, m)| n > *m) {
            largest = Some((t.name.clone(), shape, n));
        }
    }
    let mut work: u128 = 0;
    let mut busiest: Option<(String, u128)> = None;
    for (h, e) in cascade.einsums.iter() {
        let ranks = cascade.iteration_ranks(h);
        let mut points = product(&mut ranks.iter().map(|&r| cascade.ranks[r].extent));
        if let Some(rec) = &e.recurrence {
            // The init writes step 0 at every point of the other ranks.
            let others = ranks
                .iter()
                .filter(|&&r| r != rec.rank && !e.is_reduced(r))
                .map(|&r| cascade.ranks[r].extent);
            points = points.saturating_add(product(&mut others.into_iter()));
        }
        work = work.saturating_add(points);
        if busiest.as_ref().is_none_or(|(_, m)| points > *m) {
            busiest = Some((cascade.tensors[e.output.tensor].name.clone(), points));
        }
    }
    Estimate {
        elements,
        work,
        largest,
        busiest,
        limits,
    }
}

/// [`estimate`], as an error when it exceeds `limits`.
pub fn check_limits(cascade: &Cascade, limits: Limits) -> Result<Estimate, EvalError> {
    let e = estimate(cascade, limits);
    if e.exceeds() {
        Err(EvalError::TooLarge(Box::new(e)))
    } else {
        Ok(e)
    }
}

/// [`random_inputs`] after [`check_limits`]: the entry point for evaluations of sizes a
/// user chose.
pub fn random_inputs_limited(
    cascade: &Cascade,
    seed: u64,
    limits: Limits,
) -> Result<HashMap<Handle<Tensor>, TensorData>, EvalError> {
    check_limits(cascade, limits)?;
    Ok(random_inputs(cascade, seed))
}

/// [`evaluate_in_order`] after [`check_limits`].
pub fn evaluate_in_order_limited(
    cascade: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
    order: &[Handle<Einsum>],
    limits: Limits,
) -> Result<Values, EvalError> {
    check_limits(cascade, limits)?;
    evaluate_in_order(cascade, inputs, order)
}

/// `n` zeros, or an error naming `tensor` when they cannot be allocated (instead of the
/// allocator aborting the process).
fn zeros<T: Clone + Default>(tensor: &str, n: u128) -> Result<Vec<T>, EvalError> {
    let too_large = || EvalError::Allocation {
        tensor: tensor.to_string(),
        elements: n,
    };
    let len = usize::try_from(n).map_err(|_| too_large())?;
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| too_large())?;
    v.resize(len, T::default());
    Ok(v)
}

/// Elements of a shape, exactly.
fn elements_of(shape: &[usize]) -> u128 {
    shape
        .iter()
        .fold(1u128, |a, &d| a.saturating_mul(d as u128))
}

/// Every tensor's value after evaluation, inputs included.
#[derive(Clone, Debug, Default)]
pub struct Values {
    pub tensors: HashMap<Handle<Tensor>, TensorData>,
    /// Per Einsum that produced a NaN from operands that were not NaN, the first such
    /// point, in evaluation order: NaN is a value of the f64 semantics, but one a user
    /// almost never wants (`exp(-inf - -inf)` of a running max nothing has reached yet).
    pub nan_origins: Vec<NanOrigin>,
}

/// Where a NaN first appeared in one Einsum.
#[derive(Clone, Debug, PartialEq)]
pub struct NanOrigin {
    pub einsum: Handle<Einsum>,
    /// The point, as (rank, index) over the Einsum's iteration ranks.
    pub point: Vec<(Handle<Rank>, i64)>,
    /// The operation, with its operands: `-inf - -inf`.
    pub operation: String,
}

impl NanOrigin {
    /// One sentence for a user: the Einsum, the point, the operation and, for the
    /// infinite difference a running max left at `-inf` produces, how to avoid it.
    pub fn message(&self, cascade: &Cascade) -> String {
        let e = &cascade.einsums[self.einsum];
        let name = &cascade.tensors[e.output.tensor].name;
        let point: Vec<String> = self
            .point
            .iter()
            .map(|(r, i)| format!("{}={i}", cascade.ranks[*r].name))
            .collect();
        let mut text = format!(
            "`{name}` computes NaN at ({}): {} is NaN",
            point.join(", "),
            self.operation
        );
        if self.operation.contains("inf - -inf") || self.operation.contains("inf - inf") {
            let neg_inf_state = cascade.einsums.iter().find(|(_, x)| {
                x.recurrence
                    .as_ref()
                    .is_some_and(|r| r.init == Expr::Literal(f64::NEG_INFINITY))
                    && matches!(x.expr, Expr::Binary(BinaryOp::Max, _, _))
            });
            if let Some((_, x)) = neg_inf_state {
                let state = &cascade.tensors[x.output.tensor].name;
                text.push_str(&format!(
                    "; the running max `{state}` starts at -inf and stays there while a mask hides \
                     every point seen so far, so exp(-inf - -inf) = NaN: start it at a finite \
                     value such as -1e30 (examples/attention_sliding_window.ein does)"
                ));
            }
        }
        text
    }
}

impl Values {
    pub fn get(&self, tensor: Handle<Tensor>) -> Option<&TensorData> {
        self.tensors.get(&tensor)
    }
}

/// The shape of a tensor as stored (an iterative dimension holds extent + 1 steps).
pub fn shape_of(cascade: &Cascade, tensor: Handle<Tensor>) -> Vec<usize> {
    (0..cascade.tensors[tensor].ranks.len())
        .map(|d| cascade.dim_extent(tensor, d) as usize)
        .collect()
}

/// Draws inputs from a seeded generator: inputs uniform in [-1, 1); parameters take their
/// default, or uniform in [0.05, 1) (positive, so decays decay). Tensor `j` draws from
/// stream `j` of the generator and each block of [`RANDOM_BLOCK`] values from its own
/// window of that stream, so large inputs fill on every core and the values depend only
/// on the seed.
pub fn random_inputs(cascade: &Cascade, seed: u64) -> HashMap<Handle<Tensor>, TensorData> {
    random_inputs_of(cascade, seed, |_| true)
}

/// [`random_inputs`] for the tensors `wanted` accepts (each draws the values it would
/// draw there).
pub fn random_inputs_of(
    cascade: &Cascade,
    seed: u64,
    wanted: impl Fn(&Tensor) -> bool,
) -> HashMap<Handle<Tensor>, TensorData> {
    let mut out = HashMap::new();
    let ids = compared_for_equality(cascade);
    for (j, (h, t)) in cascade.tensors.iter().enumerate() {
        if !wanted(t) {
            continue;
        }
        let shape = shape_of(cascade, h);
        let n: usize = shape.iter().product();
        if t.kind == TensorKind::Input && ids.contains(&h) {
            out.insert(h, segment_ids(shape, seed, j as u64));
            continue;
        }
        let range = match (t.kind, t.default) {
            (TensorKind::Input, _) => -1.0..1.0,
            (TensorKind::Param, Some(v)) => {
                out.insert(h, TensorData::filled(shape, v));
                continue;
            }
            (TensorKind::Param, None) => 0.05..1.0,
            _ => continue,
        };
        let mut values = vec![0.0; n];
        let fill = |block: usize, chunk: &mut [f64]| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(j as u64);
            rng.set_word_pos((block as u128) << 32);
            for x in chunk {
                *x = rng.random_range(range.clone());
            }
        };
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        if n <= RANDOM_BLOCK || threads == 1 {
            for (b, chunk) in values.chunks_mut(RANDOM_BLOCK).enumerate() {
                fill(b, chunk);
            }
        } else {
            let blocks: Vec<(usize, &mut [f64])> =
                values.chunks_mut(RANDOM_BLOCK).enumerate().collect();
            let per_thread = blocks.len().div_ceil(threads);
            let mut blocks = blocks.into_iter();
            std::thread::scope(|scope| loop {
                let part: Vec<_> = blocks.by_ref().take(per_thread).collect();
                if part.is_empty() {
                    break;
                }
                scope.spawn(move || {
                    for (b, chunk) in part {
                        fill(b, chunk);
                    }
                });
            });
        }
        out.insert(h, TensorData::new(shape, values));
    }
    out
}

/// Inputs that a value mask compares with `==` or `!=` (document or segment ids): drawn
/// from a continuous range, two of their values would almost never be equal and the mask
/// would keep only the diagonal, so they are drawn as ids instead.
fn compared_for_equality(cascade: &Cascade) -> Vec<Handle<Tensor>> {
    let mut out = Vec::new();
    for (_, e) in cascade.einsums.iter() {
        for c in &e.value_mask {
            if matches!(c.op, CmpOp::Eq | CmpOp::Ne) {
                c.visit_accesses(&mut |a| out.push(a.tensor));
            }
        }
    }
    out
}

/// Nondecreasing integer ids along the last dimension, as packed documents are: each
/// row (every index of the other dimensions) is cut at up to four random positions, so a
/// row holds one to five runs of equal ids.
fn segment_ids(shape: Vec<usize>, seed: u64, stream: u64) -> TensorData {
    let len = shape.last().copied().unwrap_or(1).max(1);
    let rows = shape.iter().product::<usize>() / len;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut values = Vec::with_capacity(rows * len);
    for _ in 0..rows {
        let mut cuts: Vec<usize> = (0..4).map(|_| rng.random_range(1..len.max(2))).collect();
        cuts.sort_unstable();
        values.extend((0..len).map(|i| cuts.iter().filter(|&&c| c <= i).count() as f64));
    }
    TensorData::new(shape, values)
}

/// Values drawn from one window of the generator by [`random_inputs`].
pub const RANDOM_BLOCK: usize = 1 << 16;

/// An access with its offset precomputed as `base + sum(stride * index[rank])`.
#[derive(Clone)]
struct FlatAccess {
    tensor: Handle<Tensor>,
    base: i64,
    strides: Vec<(usize, i64)>,
    /// Per dimension, to report out-of-range indices precisely.
    dims: Vec<(IndexExpr, u64)>,
    span: Span,
}

impl FlatAccess {
    fn new(cascade: &Cascade, access: &Access) -> Self {
        let shape = shape_of(cascade, access.tensor);
        let mut stride = 1i64;
        let mut strides_per_dim = vec![0i64; shape.len()];
        for d in (0..shape.len()).rev() {
            strides_per_dim[d] = stride;
            stride *= shape[d] as i64;
        }
        let mut base = 0i64;
        let mut strides: Vec<(usize, i64)> = Vec::new();
        for (d, index) in access.indices.iter().enumerate() {
            let s = strides_per_dim.get(d).copied().unwrap_or(0);
            base += index.constant * s;
            for (coef, rank) in &index.terms {
                match strides.iter_mut().find(|(r, _)| *r == rank.index()) {
                    Some(entry) => entry.1 += coef * s,
                    None => strides.push((rank.index(), coef * s)),
                }
            }
        }
        FlatAccess {
            tensor: access.tensor,
            base,
            strides,
            dims: access
                .indices
                .iter()
                .cloned()
                .zip(shape.iter().map(|&e| e as u64))
                .collect(),
            span: access.span,
        }
    }

    fn offset(&self, cascade: &Cascade, idx: &[i64]) -> Result<usize, EvalError> {
        for (expr, extent) in &self.dims {
            let i = expr.eval(|r| idx[r.index()]);
            if i < 0 || i as u64 >= *extent {
                return Err(EvalError::OutOfRange {
                    tensor: cascade.tensors[self.tensor].name.clone(),
                    index: i,
                    extent: *extent,
                    span: self.span,
                });
            }
        }
        Ok(self
            .strides
            .iter()
            .fold(self.base, |acc, (r, s)| acc + s * idx[*r]) as usize)
    }
}

/// An expression with its accesses flattened, evaluated point by point.
enum Node {
    Literal(f64),
    Access(usize),
    Index(IndexExpr),
    Unary(UnaryOp, Box<Node>),
    Binary(BinaryOp, Box<Node>, Box<Node>),
}

fn flatten(cascade: &Cascade, expr: &Expr, accesses: &mut Vec<FlatAccess>) -> Node {
    match expr {
        Expr::Literal(v) => Node::Literal(*v),
        Expr::Index(i) => Node::Index(i.clone()),
        Expr::Access(a) => {
            accesses.push(FlatAccess::new(cascade, a));
            Node::Access(accesses.len() - 1)
        }
        Expr::Unary(op, a) => Node::Unary(*op, Box::new(flatten(cascade, a, accesses))),
        Expr::Binary(op, a, b) => Node::Binary(
            *op,
            Box::new(flatten(cascade, a, accesses)),
            Box::new(flatten(cascade, b, accesses)),
        ),
    }
}

struct Evaluator<'a> {
    cascade: &'a Cascade,
    values: &'a HashMap<Handle<Tensor>, TensorData>,
    /// The state a recurrence is advancing, read in place of `values`.
    state: Option<(Handle<Tensor>, &'a TensorData)>,
    accesses: Vec<FlatAccess>,
    /// The first operation that made a NaN from operands that were not NaN.
    nan: std::cell::RefCell<Option<String>>,
}

impl<'a> Evaluator<'a> {
    fn new(
        cascade: &'a Cascade,
        values: &'a HashMap<Handle<Tensor>, TensorData>,
        state: Option<(Handle<Tensor>, &'a TensorData)>,
        accesses: Vec<FlatAccess>,
    ) -> Self {
        Evaluator {
            cascade,
            values,
            state,
            accesses,
            nan: std::cell::RefCell::new(None),
        }
    }

    fn note_nan(&self, describe: impl FnOnce() -> String) {
        let mut first = self.nan.borrow_mut();
        if first.is_none() {
            *first = Some(describe());
        }
    }

    /// `Ok(None)` when an operand is absent.
    fn eval(&self, node: &Node, idx: &[i64]) -> Result<Option<f64>, EvalError> {
        Ok(match node {
            Node::Literal(v) => Some(*v),
            Node::Index(i) => Some(i.eval(|r| idx[r.index()]) as f64),
            Node::Access(k) => {
                let access = &self.accesses[*k];
                let data = match self.state {
                    Some((t, data)) if t == access.tensor => Some(data),
                    _ => self.values.get(&access.tensor),
                };
                let data = data.ok_or_else(|| EvalError::Unassigned {
                    tensor: self.cascade.tensors[access.tensor].name.clone(),
                    span: access.span,
                })?;
                data.get(access.offset(self.cascade, idx)?)
            }
            Node::Unary(op, a) => self.eval(a, idx)?.map(|x| {
                let y = op.apply(x);
                if y.is_nan() && !x.is_nan() {
                    self.note_nan(|| format!("{}({})", op.name(), show(x)));
                }
                y
            }),
            Node::Binary(op, a, b) => match (self.eval(a, idx)?, self.eval(b, idx)?) {
                (Some(x), Some(y)) => {
                    let z = op.apply(x, y);
                    if z.is_nan() && !x.is_nan() && !y.is_nan() {
                        self.note_nan(|| match op.infix() {
                            Some(sym) => format!("{} {sym} {}", show(x), show(y)),
                            None => format!("{}({}, {})", op.name(), show(x), show(y)),
                        });
                    }
                    Some(z)
                }
                _ => None,
            },
        })
    }

    /// Whether a value condition holds; `None` when it reads an absent value.
    fn holds(&self, c: &ValueNode, idx: &[i64]) -> Result<Option<bool>, EvalError> {
        Ok(match (self.eval(&c.lhs, idx)?, self.eval(&c.rhs, idx)?) {
            (Some(a), Some(b)) => Some(match c.op {
                CmpOp::Lt => a < b,
                CmpOp::Le => a <= b,
                CmpOp::Gt => a > b,
                CmpOp::Ge => a >= b,
                CmpOp::Eq => a == b,
                CmpOp::Ne => a != b,
            }),
            _ => None,
        })
    }
}

/// A number as an error message shows it: `-inf`, `0`, `1.5`.
fn show(x: f64) -> String {
    crate::print::number(x)
}

/// A value condition with its accesses flattened.
struct ValueNode {
    lhs: Node,
    op: CmpOp,
    rhs: Node,
}

/// The conditions checked once one loop level's rank is bound: affine ones first, so a
/// value condition only reads where the index conditions already hold.
#[derive(Default)]
struct Checks {
    affine: Vec<Condition>,
    values: Vec<ValueNode>,
}

impl Checks {
    fn pass(&self, ev: &Evaluator, idx: &[i64]) -> Result<bool, EvalError> {
        if !self.affine.iter().all(|c| c.holds(|r| idx[r.index()])) {
            return Ok(false);
        }
        for v in &self.values {
            if ev.holds(v, idx)? != Some(true) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One Einsum prepared for evaluation: its loop levels and the mask conditions that can be
/// checked once each level's rank is bound.
struct Plan {
    body: Node,
    /// Reductions outermost first: (rank index, extent, op, conditions checkable here).
    levels: Vec<(usize, i64, ReduceOp, Checks)>,
    /// Conditions over output ranks only.
    outer: Checks,
}

impl Plan {
    fn reduce(
        &self,
        ev: &Evaluator,
        level: usize,
        idx: &mut [i64],
    ) -> Result<Option<f64>, EvalError> {
        if level == self.levels.len() {
            return ev.eval(&self.body, idx);
        }
        let (rank, extent, op, checks) = &self.levels[level];
        let mut acc = op.identity();
        for i in 0..*extent {
            idx[*rank] = i;
            if !checks.pass(ev, idx)? {
                continue;
            }
            if let Some(v) = self.reduce(ev, level + 1, idx)? {
                let next = op.combine(acc, v);
                if next.is_nan() && !acc.is_nan() && !v.is_nan() {
                    ev.note_nan(|| format!("{}({}, {})", op.name(), show(acc), show(v)));
                }
                acc = next;
            }
        }
        Ok(Some(acc))
    }

    fn point(&self, ev: &Evaluator, idx: &mut [i64]) -> Result<Option<f64>, EvalError> {
        if !self.outer.pass(ev, idx)? {
            return Ok(None);
        }
        self.reduce(ev, 0, idx)
    }
}

fn plan(cascade: &Cascade, einsum: &Einsum, accesses: &mut Vec<FlatAccess>) -> Plan {
    let body = flatten(cascade, &einsum.expr, accesses);
    // Outermost reduction first; a condition is checked at the first level where all
    // of its ranks are bound, so a masked outer point skips its whole inner reduction.
    let order: Vec<&Reduction> = einsum.reductions.iter().rev().collect();
    let bound_level = |ranks: &mut dyn Iterator<Item = Handle<Rank>>| -> Option<usize> {
        let mut level = None;
        for r in ranks {
            if let Some(pos) = order.iter().position(|red| red.rank == r) {
                level = Some(level.map_or(pos, |l: usize| l.max(pos)));
            }
        }
        level
    };
    let mut levels: Vec<(usize, i64, ReduceOp, Checks)> = order
        .iter()
        .map(|red| {
            (
                red.rank.index(),
                cascade.ranks[red.rank].extent as i64,
                red.op,
                Checks::default(),
            )
        })
        .collect();
    let mut outer = Checks::default();
    for c in &einsum.mask {
        match bound_level(&mut c.lhs.ranks().chain(c.rhs.ranks())) {
            Some(l) => levels[l].3.affine.push(c.clone()),
            None => outer.affine.push(c.clone()),
        }
    }
    for c in &einsum.value_mask {
        let mut ranks = Vec::new();
        c.visit_indices(&mut |i| ranks.extend(i.ranks()));
        let node = ValueNode {
            lhs: flatten(cascade, &c.lhs, accesses),
            op: c.op,
            rhs: flatten(cascade, &c.rhs, accesses),
        };
        match bound_level(&mut ranks.into_iter()) {
            Some(l) => levels[l].3.values.push(node),
            None => outer.values.push(node),
        }
    }
    Plan {
        body,
        levels,
        outer,
    }
}

/// Iterates every point of `ranks` (row-major), binding them in `idx`.
fn for_each_point(
    cascade: &Cascade,
    ranks: &[Handle<Rank>],
    idx: &mut Vec<i64>,
    f: &mut dyn FnMut(&mut Vec<i64>) -> Result<(), EvalError>,
) -> Result<(), EvalError> {
    fn go(
        cascade: &Cascade,
        ranks: &[Handle<Rank>],
        k: usize,
        idx: &mut Vec<i64>,
        f: &mut dyn FnMut(&mut Vec<i64>) -> Result<(), EvalError>,
    ) -> Result<(), EvalError> {
        if k == ranks.len() {
            return f(idx);
        }
        let r = ranks[k];
        for i in 0..cascade.ranks[r].extent as i64 {
            idx[r.index()] = i;
            go(cascade, ranks, k + 1, idx, f)?;
        }
        Ok(())
    }
    go(cascade, ranks, 0, idx, f)
}

fn check_input(
    cascade: &Cascade,
    tensor: Handle<Tensor>,
    data: &TensorData,
) -> Result<(), EvalError> {
    let expected = shape_of(cascade, tensor);
    if data.shape != expected || data.values.len() as u128 != elements_of(&expected) {
        return Err(EvalError::ShapeMismatch {
            name: cascade.tensors[tensor].name.clone(),
            expected,
            got: data.shape.clone(),
        });
    }
    Ok(())
}

/// Evaluates `cascade` on `inputs` (every Input and Param tensor; a Param with a default may
/// be omitted) in the order given by `order` (a topological order of the Einsums). The
/// Einsums of a step body ([`crate::validate::step_bodies`]) are evaluated together, one
/// step at a time, when the first of them comes up.
pub fn evaluate_in_order(
    cascade: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
    order: &[Handle<Einsum>],
) -> Result<Values, EvalError> {
    let mut values: HashMap<Handle<Tensor>, TensorData> = HashMap::new();
    for (h, t) in cascade.tensors.iter() {
        match (t.kind, inputs.get(&h)) {
            (TensorKind::Input | TensorKind::Param, Some(data)) => {
                check_input(cascade, h, data)?;
                values.insert(h, data.clone());
            }
            (TensorKind::Param, None) if t.default.is_some() => {
                let shape = shape_of(cascade, h);
                let mut data = zeros(&t.name, elements_of(&shape))?;
                data.fill(t.default.unwrap_or(0.0));
                values.insert(h, TensorData::new(shape, data));
            }
            (TensorKind::Input | TensorKind::Param, None) => {
                return Err(EvalError::MissingInput {
                    name: t.name.clone(),
                    kind: if t.kind == TensorKind::Input {
                        "input"
                    } else {
                        "parameter"
                    },
                })
            }
            _ => {}
        }
    }
    let bodies = crate::validate::step_bodies(cascade);
    let mut done = vec![false; cascade.einsums.len()];
    let mut nan_origins = Vec::new();
    for &e in order {
        if done.get(e.index()).copied().unwrap_or(true) {
            continue;
        }
        if let Some(body) = bodies.iter().find(|b| b.einsums.contains(&e)) {
            let origins = evaluate_step_body(cascade, body, &mut values)?;
            nan_origins.extend(origins);
            for m in &body.einsums {
                done[m.index()] = true;
            }
            continue;
        }
        let (data, nan) = evaluate_einsum(cascade, e, &values)?;
        nan_origins.extend(nan);
        values.insert(cascade.einsums[e].output.tensor, data);
        done[e.index()] = true;
    }
    Ok(Values {
        tensors: values,
        nan_origins,
    })
}

/// The output of `einsum` before any point is written: nothing present.
/// Allocated with a checked size: a tensor past this host's memory is an error, not an
/// abort.
fn empty_output(cascade: &Cascade, einsum: Handle<Einsum>) -> Result<TensorData, EvalError> {
    let target = cascade.einsums[einsum].output.tensor;
    let shape = shape_of(cascade, target);
    let n = elements_of(&shape);
    let name = &cascade.tensors[target].name;
    Ok(TensorData {
        shape,
        values: zeros(name, n)?,
        present: Some(zeros(name, n)?),
    })
}

/// The free ranks of an Einsum: its iteration ranks that it does not reduce.
fn free_ranks(cascade: &Cascade, einsum: Handle<Einsum>) -> Vec<Handle<Rank>> {
    let e = &cascade.einsums[einsum];
    cascade
        .iteration_ranks(einsum)
        .into_iter()
        .filter(|&r| !e.is_reduced(r))
        .collect()
}

fn origin(
    cascade: &Cascade,
    einsum: Handle<Einsum>,
    idx: &[i64],
    operation: Option<String>,
) -> Option<NanOrigin> {
    operation.map(|operation| NanOrigin {
        einsum,
        point: cascade
            .iteration_ranks(einsum)
            .into_iter()
            .filter(|r| !cascade.einsums[einsum].is_reduced(*r))
            .map(|r| (r, idx[r.index()]))
            .collect(),
        operation,
    })
}

/// Evaluates the members of a step body together: their outputs start empty (states get
/// their init), then for each step of the rank every member computes its points of that
/// step, in the body's order, reading what the others wrote so far.
fn evaluate_step_body(
    cascade: &Cascade,
    body: &crate::validate::StepBody,
    values: &mut HashMap<Handle<Tensor>, TensorData>,
) -> Result<Vec<NanOrigin>, EvalError> {
    let mut idx = vec![0i64; cascade.ranks.len()];
    let mut nan: Vec<Option<NanOrigin>> = vec![None; body.einsums.len()];
    for &e in &body.einsums {
        values.insert(cascade.einsums[e].output.tensor, empty_output(cascade, e)?);
    }
    // Step 0 of every state.
    for (k, &e) in body.einsums.iter().enumerate() {
        let einsum = &cascade.einsums[e];
        let Some(rec) = &einsum.recurrence else {
            continue;
        };
        let mut accesses = Vec::new();
        let init = flatten(cascade, &rec.init, &mut accesses);
        let init_out = init_access(
            cascade,
            einsum,
            cascade.tensors[einsum.output.tensor].iterative,
            rec,
        );
        let others: Vec<Handle<Rank>> = free_ranks(cascade, e)
            .into_iter()
            .filter(|&r| r != rec.rank)
            .collect();
        let mut writes = Vec::new();
        {
            let ev = Evaluator::new(cascade, values, None, accesses);
            for_each_point(cascade, &others, &mut idx, &mut |idx| {
                writes.push((init_out.offset(cascade, idx)?, ev.eval(&init, idx)?));
                if nan[k].is_none() {
                    nan[k] = origin(cascade, e, idx, ev.nan.borrow_mut().take());
                }
                Ok(())
            })?;
        }
        if let Some(out) = values.get_mut(&einsum.output.tensor) {
            for (off, v) in writes {
                write(out, off, v);
            }
        }
    }
    let mut accesses: Vec<Vec<FlatAccess>> = Vec::new();
    let mut plans: Vec<(Plan, FlatAccess, Vec<Handle<Rank>>)> = Vec::new();
    for &e in &body.einsums {
        let einsum = &cascade.einsums[e];
        let mut flat = Vec::new();
        let p = plan(cascade, einsum, &mut flat);
        let others = free_ranks(cascade, e)
            .into_iter()
            .filter(|&r| r != body.rank)
            .collect();
        accesses.push(flat);
        plans.push((p, FlatAccess::new(cascade, &einsum.output), others));
    }
    // Every member advances the same way (validation checks it); a body of plain members
    // only (no state) never forms, so the first state's direction is the body's.
    let reverse = body
        .einsums
        .iter()
        .find_map(|&e| cascade.einsums[e].recurrence.as_ref())
        .is_some_and(|r| r.reverse);
    let steps = cascade.ranks[body.rank].extent as i64;
    for k in 0..steps {
        let step = if reverse { steps - 1 - k } else { k };
        idx[body.rank.index()] = step;
        for (k, &e) in body.einsums.iter().enumerate() {
            let (plan, output, others) = &plans[k];
            let target = cascade.einsums[e].output.tensor;
            let mut writes = Vec::new();
            let work = PointWork {
                einsum: e,
                plan,
                accesses: &accesses[k],
                output,
                state: None,
            };
            let found = evaluate_points(cascade, values, &work, others, &idx, &mut |o, v| {
                writes.push((o, v))
            })?;
            if nan[k].is_none() {
                nan[k] = found;
            }
            if let Some(out) = values.get_mut(&target) {
                for (off, v) in writes {
                    write(out, off, v);
                }
            }
        }
    }
    for &e in &body.einsums {
        let t = cascade.einsums[e].output.tensor;
        if let Some(out) = values.get_mut(&t) {
            if out.present.as_ref().is_some_and(|p| p.iter().all(|&x| x)) {
                out.present = None;
            }
        }
    }
    Ok(nan.into_iter().flatten().collect())
}

fn evaluate_einsum(
    cascade: &Cascade,
    einsum: Handle<Einsum>,
    values: &HashMap<Handle<Tensor>, TensorData>,
) -> Result<(TensorData, Option<NanOrigin>), EvalError> {
    let e = &cascade.einsums[einsum];
    let target = e.output.tensor;
    let mut out = empty_output(cascade, einsum)?;
    let mut accesses = Vec::new();
    let output_access = FlatAccess::new(cascade, &e.output);
    let body_plan = plan(cascade, e, &mut accesses);
    let init_node = e
        .recurrence
        .as_ref()
        .map(|rec| flatten(cascade, &rec.init, &mut accesses));
    let mut idx = vec![0i64; cascade.ranks.len()];
    let free = free_ranks(cascade, einsum);
    let mut nan: Option<NanOrigin> = None;

    match (&e.recurrence, init_node) {
        (Some(rec), Some(init)) => {
            // The state at step 0 comes from `init`; step k + 1 is computed from step k, so
            // the iterative rank is the outermost loop and each step reads a finished one
            // (reversed: the init is the last step, and step k comes from step k + 1).
            let others: Vec<Handle<Rank>> =
                free.iter().copied().filter(|&r| r != rec.rank).collect();
            let state_dim = cascade.tensors[target].iterative;
            let extent = cascade.ranks[rec.rank].extent;
            {
                let ev = Evaluator::new(cascade, values, None, std::mem::take(&mut accesses));
                let init_out = init_access(cascade, e, state_dim, rec);
                for_each_point(cascade, &others, &mut idx, &mut |idx| {
                    let off = init_out.offset(cascade, idx)?;
                    write(&mut out, off, ev.eval(&init, idx)?);
                    if nan.is_none() {
                        nan = origin(cascade, einsum, idx, ev.nan.borrow_mut().take());
                    }
                    Ok(())
                })?;
                accesses = ev.accesses;
            }
            for step in rec.step_order(extent) {
                idx[rec.rank.index()] = step;
                let mut writes = Vec::new();
                let work = PointWork {
                    einsum,
                    plan: &body_plan,
                    accesses: &accesses,
                    output: &output_access,
                    state: Some((target, &out)),
                };
                let found = evaluate_points(cascade, values, &work, &others, &idx, &mut |o, v| {
                    writes.push((o, v))
                })?;
                if nan.is_none() {
                    nan = found;
                }
                for (off, v) in writes {
                    write(&mut out, off, v);
                }
            }
        }
        _ => {
            let work = PointWork {
                einsum,
                plan: &body_plan,
                accesses: &accesses,
                output: &output_access,
                state: None,
            };
            nan = evaluate_points(cascade, values, &work, &free, &idx, &mut |off, v| {
                write(&mut out, off, v)
            })?;
        }
    }
    if out.present.as_ref().is_some_and(|p| p.iter().all(|&x| x)) {
        out.present = None;
    }
    Ok((out, nan))
}

/// Einsums with at least this many output points are evaluated on every core.
const PARALLEL_POINTS: u128 = 1 << 12;

/// Points written per message from a worker to the thread that owns the output: bounds
/// the memory in flight to a few batches per worker whatever the output's size.
const PARALLEL_BATCH: usize = 1 << 14;

/// What [`evaluate_points`] evaluates: an Einsum's plan, its flattened accesses, its
/// output access, and the state a recurrence advances (read in place of `values`).
struct PointWork<'a> {
    einsum: Handle<Einsum>,
    plan: &'a Plan,
    accesses: &'a [FlatAccess],
    output: &'a FlatAccess,
    state: Option<(Handle<Tensor>, &'a TensorData)>,
}

/// Evaluates `work` at every point of `ranks` (row-major; the other ranks as bound in
/// `base`), handing each `(offset, value)` to `sink` in the serial order's stead, and
/// returns the first NaN origin. With many points they are split across the cores by
/// ranges of the outermost rank: every point is computed as the serial loop computes it,
/// workers send batches to this thread (memory in flight: a few batches per worker), and
/// the NaN origin and the error reported are those of the first range, in the serial
/// order, that has one, so the results equal the serial loop's.
fn evaluate_points(
    cascade: &Cascade,
    values: &HashMap<Handle<Tensor>, TensorData>,
    work: &PointWork<'_>,
    ranks: &[Handle<Rank>],
    base: &[i64],
    sink: &mut dyn FnMut(usize, Option<f64>),
) -> Result<Option<NanOrigin>, EvalError> {
    type Batch = Vec<(usize, Option<f64>)>;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    // The outer ranks split across the workers: the shortest prefix with a point per
    // worker (a batch rank of extent 1 alone would leave all but one idle).
    let (mut prefix, mut prefix_points) = (0, 1u128);
    while prefix < ranks.len() && prefix_points < threads as u128 {
        prefix_points = prefix_points.saturating_mul(cascade.ranks[ranks[prefix]].extent as u128);
        prefix += 1;
    }
    // One range of the prefix's linear index (all points when `range` is None), sent in
    // batches.
    let run = |range: Option<(i64, i64)>,
               send: &mut dyn FnMut(Batch)|
     -> Result<Option<NanOrigin>, EvalError> {
        let ev = Evaluator::new(cascade, values, work.state, work.accesses.to_vec());
        let mut idx = base.to_vec();
        let mut nan = None;
        let mut batch: Batch = Vec::new();
        let mut point = |idx: &mut Vec<i64>| -> Result<(), EvalError> {
            let off = work.output.offset(cascade, idx)?;
            batch.push((off, work.plan.point(&ev, idx)?));
            if nan.is_none() {
                nan = origin(cascade, work.einsum, idx, ev.nan.borrow_mut().take());
            }
            if batch.len() == PARALLEL_BATCH {
                send(std::mem::take(&mut batch));
            }
            Ok(())
        };
        match range {
            Some((lo, hi)) => {
                // Linear indices of the split prefix, decoded row-major.
                for linear in lo..hi {
                    let mut rest = linear;
                    for &r in ranks[..prefix].iter().rev() {
                        let extent = cascade.ranks[r].extent as i64;
                        idx[r.index()] = rest % extent;
                        rest /= extent;
                    }
                    for_each_point(cascade, &ranks[prefix..], &mut idx, &mut point)?;
                }
            }
            None => for_each_point(cascade, ranks, &mut idx, &mut point)?,
        }
        send(batch);
        Ok(nan)
    };
    let points = ranks.iter().fold(1u128, |n, &r| {
        n.saturating_mul(cascade.ranks[r].extent as u128)
    });
    if threads == 1 || points < PARALLEL_POINTS || prefix_points > i64::MAX as u128 {
        return run(None, &mut |batch| {
            for (off, v) in batch {
                sink(off, v);
            }
        });
    }
    let extent = prefix_points as i64;
    let ranges = (threads as i64).min(extent).max(1);
    let per_range = (extent + ranges - 1) / ranges;
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Batch>(2 * threads);
    let outcomes = std::thread::scope(|scope| {
        let run = &run;
        let workers: Vec<_> = (0..ranges)
            .map(|k| {
                let sender = sender.clone();
                let range = (k * per_range, ((k + 1) * per_range).min(extent));
                // The receiver drains below until every worker has finished.
                scope.spawn(move || {
                    run(Some(range), &mut |batch| {
                        let _ = sender.send(batch);
                    })
                })
            })
            .collect();
        // Only the workers' senders remain: the channel closes when the last one ends.
        drop(sender);
        for batch in receiver.iter() {
            for (off, v) in batch {
                sink(off, v);
            }
        }
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Vec<_>>()
    });
    let mut nan = None;
    for outcome in outcomes {
        if let Some(found) = outcome? {
            nan.get_or_insert(found);
        }
    }
    Ok(nan)
}

/// The output access of the init: the state's iterative dimension at step 0 (at the last
/// step for a reverse recurrence).
fn init_access(
    cascade: &Cascade,
    e: &Einsum,
    state_dim: Option<usize>,
    rec: &crate::Recurrence,
) -> FlatAccess {
    let mut access = e.output.clone();
    if let Some(d) = state_dim {
        if let Some(index) = access.indices.get_mut(d) {
            *index = IndexExpr::constant(rec.init_step(cascade.ranks[rec.rank].extent));
        }
    }
    FlatAccess::new(cascade, &access)
}

fn write(out: &mut TensorData, offset: usize, value: Option<f64>) {
    if let Some(v) = value {
        out.values[offset] = v;
        if let Some(p) = out.present.as_mut() {
            p[offset] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(c: &mut Cascade, name: &str, extent: u64) -> Handle<Rank> {
        c.ranks.append(Rank {
            name: name.into(),
            extent,
            source: ExtentSource::Literal,
            split: None,
            parent: None,
            span: Span::UNKNOWN,
        })
    }

    fn tensor(
        c: &mut Cascade,
        name: &str,
        ranks: &[Handle<Rank>],
        kind: TensorKind,
    ) -> Handle<Tensor> {
        c.tensors.append(Tensor {
            name: name.into(),
            ranks: ranks.to_vec(),
            kind,
            dtype: (kind != TensorKind::Temp).then_some(DType::F32),
            iterative: None,
            default: None,
            span: Span::UNKNOWN,
        })
    }

    fn access(t: Handle<Tensor>, ranks: &[Handle<Rank>]) -> Access {
        Access {
            tensor: t,
            indices: ranks.iter().map(|&r| IndexExpr::rank(r)).collect(),
            span: Span::UNKNOWN,
        }
    }

    /// `O[i] = A[i, j] * B[j]` summed over j, with extents `n` and `m`.
    fn matvec(n: u64, m: u64) -> Cascade {
        let mut c = Cascade::default();
        let i = rank(&mut c, "i", n);
        let j = rank(&mut c, "j", m);
        let a = tensor(&mut c, "A", &[i, j], TensorKind::Input);
        let b = tensor(&mut c, "B", &[j], TensorKind::Input);
        let o = tensor(&mut c, "O", &[i], TensorKind::Output);
        c.einsums.append(Einsum {
            output: access(o, &[i]),
            expr: Expr::binary(
                BinaryOp::Mul,
                Expr::Access(access(a, &[i, j])),
                Expr::Access(access(b, &[j])),
            ),
            reductions: vec![Reduction {
                rank: j,
                op: ReduceOp::Sum,
            }],
            mask: Vec::new(),
            value_mask: Vec::new(),
            recurrence: None,
            span: Span::UNKNOWN,
        });
        c
    }

    #[test]
    fn the_estimate_counts_every_tensor_and_every_point() {
        let e = estimate(&matvec(3, 5), Limits::default());
        assert_eq!(e.elements, 15 + 5 + 3);
        assert_eq!(e.work, 15);
        assert_eq!(e.largest.as_ref().map(|l| l.0.as_str()), Some("A"));
        assert!(!e.exceeds());
    }

    #[test]
    fn sizes_past_the_limits_are_refused_before_allocating() {
        // 2^40 x 2^40: neither the inputs nor the loop could ever finish.
        let c = matvec(1 << 40, 1 << 40);
        let err = random_inputs_limited(&c, 0, Limits::default()).unwrap_err();
        let EvalError::TooLarge(e) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(e.work, 1u128 << 80);
        let text = err.to_string();
        assert!(text.contains("1208925819614629174706176 points"), "{text}");
        assert!(text.contains("the largest tensor is `A`"), "{text}");
        let values = evaluate_in_order_limited(&c, &HashMap::new(), &[], Limits::default());
        assert!(matches!(values, Err(EvalError::TooLarge(_))));
        // Tight limits refuse small cascades too, naming the bound that was passed.
        let tight = Limits {
            max_elements: 10,
            max_work: 1000,
        };
        let err = check_limits(&matvec(3, 5), tight).unwrap_err().to_string();
        assert!(err.contains("hold 23 tensor elements"), "{err}");
        assert!(!err.contains("points (the limit"), "{err}");
    }

    #[test]
    fn an_unallocatable_output_is_an_error_not_an_abort() {
        // Without limits, an output of 2^62 elements fails to allocate: reported.
        let mut c = Cascade::default();
        let i = rank(&mut c, "i", 1 << 31);
        let j = rank(&mut c, "j", 1 << 31);
        let o = tensor(&mut c, "O", &[i, j], TensorKind::Output);
        let e = c.einsums.append(Einsum {
            output: access(o, &[i, j]),
            expr: Expr::Literal(1.0),
            reductions: Vec::new(),
            mask: Vec::new(),
            value_mask: Vec::new(),
            recurrence: None,
            span: Span::UNKNOWN,
        });
        match evaluate_in_order(&c, &HashMap::new(), &[e]) {
            Err(EvalError::Allocation { tensor, elements }) => {
                assert_eq!(tensor, "O");
                assert_eq!(elements, 1u128 << 62);
            }
            other => panic!("{other:?}"),
        }
    }
}
