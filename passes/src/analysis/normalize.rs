//! A read-only view of a cascade in which every split rank is replaced by its children.
//!
//! The language lets an Einsum that iterates `m1` and `m0` write the parent `m` for the
//! combined index `m1 * M0 + m0`; a tensor may also be declared over the parent (`K[m, e]`).
//! Whether the front end keeps the parent handle or substitutes it, the analysis must see
//! the same thing, so every index expression, mask condition, reduction and tensor dimension
//! is rewritten here over *leaf* ranks (ranks that are not split). Everything downstream
//! reasons about leaves only.

pub(crate) use super::points::AffineRelation as Relation;
use einattn_ir::{
    Cascade, CmpOp, Condition, Einsum, Expr, Handle, IndexExpr, Rank, ReduceOp, Tensor,
};

/// One tensor access with its indices over leaf ranks.
#[derive(Clone, Debug)]
pub(crate) struct LeafAccess {
    pub tensor: Handle<Tensor>,
    pub indices: Vec<IndexExpr>,
    /// A recurrence reading its own state at the current step: not a dependency.
    pub self_read: bool,
}

/// A mask condition as `sum(coef * rank) + constant REL 0` over leaf ranks, so two
/// spellings of the same condition compare equal and can be deduplicated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LeafCondition {
    /// Sorted by rank, no zero coefficients.
    pub terms: Vec<(i64, Handle<Rank>)>,
    pub constant: i64,
    pub relation: Relation,
}

impl LeafCondition {
    /// Builds `lhs - rhs REL 0` from `lhs op rhs`, turning strict integer inequalities into
    /// non-strict ones (`a < b` is `a - b + 1 <= 0`).
    pub fn from_parts(lhs: &IndexExpr, op: CmpOp, rhs: &IndexExpr) -> LeafCondition {
        let mut diff = lhs.clone();
        for &(c, r) in &rhs.terms {
            diff.add_term(-c, r);
        }
        diff.constant -= rhs.constant;
        let negate = |e: &IndexExpr| IndexExpr {
            terms: e.terms.iter().map(|&(c, r)| (-c, r)).collect(),
            constant: -e.constant,
        };
        let (form, relation) = match op {
            CmpOp::Le => (diff, Relation::AtMostZero),
            CmpOp::Lt => {
                let mut d = diff;
                d.constant += 1;
                (d, Relation::AtMostZero)
            }
            CmpOp::Ge => (negate(&diff), Relation::AtMostZero),
            CmpOp::Gt => {
                let mut d = negate(&diff);
                d.constant += 1;
                (d, Relation::AtMostZero)
            }
            CmpOp::Eq => (diff, Relation::Zero),
            CmpOp::Ne => (diff, Relation::NonZero),
        };
        let mut terms: Vec<(i64, Handle<Rank>)> =
            form.terms.into_iter().filter(|(c, _)| *c != 0).collect();
        terms.sort_by_key(|&(_, r)| r);
        LeafCondition {
            terms,
            constant: form.constant,
            relation,
        }
    }

    pub fn mentions(&self, rank: Handle<Rank>) -> bool {
        self.terms.iter().any(|&(_, r)| r == rank)
    }

    pub fn ranks(&self) -> impl Iterator<Item = Handle<Rank>> + '_ {
        self.terms.iter().map(|&(_, r)| r)
    }

    /// Replaces each rank by an index expression (used to move a producer's mask into a
    /// consumer's iteration space through the consumer's access indices).
    pub fn substitute(&self, image: impl Fn(Handle<Rank>) -> IndexExpr) -> LeafCondition {
        let mut form = IndexExpr::constant(self.constant);
        for &(c, r) in &self.terms {
            let e = image(r);
            for &(ec, er) in &e.terms {
                form.add_term(c * ec, er);
            }
            form.constant += c * e.constant;
        }
        let mut terms = form.terms;
        terms.sort_by_key(|&(_, r)| r);
        LeafCondition {
            terms,
            constant: form.constant,
            relation: self.relation,
        }
    }
}

/// An Einsum seen over leaf ranks.
#[derive(Clone, Debug)]
pub(crate) struct LeafEinsum {
    pub handle: Handle<Einsum>,
    /// The output tensor's name: Einsums are named by what they assign.
    pub name: String,
    pub output_tensor: Handle<Tensor>,
    pub output: Vec<IndexExpr>,
    /// Reads of the expression, then reads of a recurrence's `init`.
    pub accesses: Vec<LeafAccess>,
    /// The iteration space over leaf ranks, in first-mention order.
    pub space: Vec<Handle<Rank>>,
    /// Reduced leaf ranks with their operators, innermost first.
    pub reductions: Vec<(Handle<Rank>, ReduceOp)>,
    /// The Einsum's own mask (not what it inherits from its inputs).
    pub mask: Vec<LeafCondition>,
    /// Its conditions on values (data-dependent masks), as written.
    pub value_mask: Vec<String>,
    pub recurrence_rank: Option<Handle<Rank>>,
    /// For a recurrence or a member of a step body: the leaf rank it steps along, and
    /// whether it runs down that rank (a reverse recurrence, an adjoint state).
    pub steps: Option<(Handle<Rank>, bool)>,
}

impl LeafEinsum {
    pub fn iterates(&self, rank: Handle<Rank>) -> bool {
        self.space.contains(&rank)
    }

    pub fn reduces(&self, rank: Handle<Rank>) -> bool {
        self.reductions.iter().any(|&(r, _)| r == rank)
    }

    pub fn reduction_op(&self, rank: Handle<Rank>) -> Option<ReduceOp> {
        self.reductions
            .iter()
            .find(|&&(r, _)| r == rank)
            .map(|&(_, op)| op)
    }
}

/// The whole cascade over leaf ranks, with producers, consumers and a topological order.
pub(crate) struct LeafCascade<'c> {
    pub cascade: &'c Cascade,
    /// Indexed by `Handle<Einsum>::index()`.
    pub einsums: Vec<LeafEinsum>,
    /// Einsums in dependency order (recurrence self-reads are not edges).
    pub order: Vec<Handle<Einsum>>,
    /// Per tensor, per dimension: the leaf ranks that dimension spans.
    pub tensor_dims: Vec<Vec<Vec<Handle<Rank>>>>,
    /// Per tensor: the Einsum that assigns it.
    pub producer: Vec<Option<Handle<Einsum>>>,
    /// Per tensor: the Einsums that read it (self-reads excluded), in topological order.
    pub consumers: Vec<Vec<Handle<Einsum>>>,
    /// Leaf ranks that are parallel everywhere (batch, head, query).
    pub parallel: Vec<Handle<Rank>>,
    /// Problems found while building the view (the validator should have caught them).
    pub warnings: Vec<String>,
}

/// The leaf ranks under `rank`, outer before inner.
pub(crate) fn leaf_ranks(cascade: &Cascade, rank: Handle<Rank>) -> Vec<Handle<Rank>> {
    let mut out = Vec::new();
    push_leaves(cascade, rank, &mut out, 0);
    out
}

fn push_leaves(cascade: &Cascade, rank: Handle<Rank>, out: &mut Vec<Handle<Rank>>, depth: usize) {
    // Splits nest at most a few levels; the depth guard only stops a malformed cycle.
    match (&cascade.ranks[rank].split, depth < 16) {
        (Some(split), true) => {
            push_leaves(cascade, split.outer, out, depth + 1);
            push_leaves(cascade, split.inner, out, depth + 1);
        }
        _ => out.push(rank),
    }
}

/// Rewrites an index expression over leaf ranks: a split rank `r` becomes
/// `outer * extent(inner) + inner`, recursively.
pub(crate) fn expand_index(cascade: &Cascade, index: &IndexExpr) -> IndexExpr {
    expand_index_depth(cascade, index, 0)
}

fn expand_index_depth(cascade: &Cascade, index: &IndexExpr, depth: usize) -> IndexExpr {
    let mut out = IndexExpr::constant(index.constant);
    for &(coef, rank) in &index.terms {
        match (&cascade.ranks[rank].split, depth < 16) {
            (Some(split), true) => {
                let tile = cascade.ranks[split.inner].extent as i64;
                let combined = IndexExpr {
                    terms: vec![(tile, split.outer), (1, split.inner)],
                    constant: 0,
                };
                let leaves = expand_index_depth(cascade, &combined, depth + 1);
                for &(c, r) in &leaves.terms {
                    out.add_term(coef * c, r);
                }
                out.constant += coef * leaves.constant;
            }
            _ => out.add_term(coef, rank),
        }
    }
    out
}

fn leaf_condition(cascade: &Cascade, condition: &Condition) -> LeafCondition {
    LeafCondition::from_parts(
        &expand_index(cascade, &condition.lhs),
        condition.op,
        &expand_index(cascade, &condition.rhs),
    )
}

impl<'c> LeafCascade<'c> {
    pub fn new(cascade: &'c Cascade) -> LeafCascade<'c> {
        let mut warnings = Vec::new();
        let tensor_dims: Vec<Vec<Vec<Handle<Rank>>>> = cascade
            .tensors
            .iter()
            .map(|(_, t)| t.ranks.iter().map(|&r| leaf_ranks(cascade, r)).collect())
            .collect();

        let bodies = einattn_ir::validate::step_bodies(cascade);
        let einsums: Vec<LeafEinsum> = cascade
            .einsums
            .iter()
            .map(|(handle, e)| leaf_einsum(cascade, handle, e, &bodies))
            .collect();

        let mut producer: Vec<Option<Handle<Einsum>>> = vec![None; cascade.tensors.len()];
        for e in &einsums {
            match producer[e.output_tensor.index()] {
                None => producer[e.output_tensor.index()] = Some(e.handle),
                Some(_) => warnings.push(format!(
                    "tensor {} is assigned more than once; the analysis uses the first assignment",
                    e.name
                )),
            }
        }

        let order = topological_order(&einsums, &producer, &mut warnings);

        let mut consumers: Vec<Vec<Handle<Einsum>>> = vec![Vec::new(); cascade.tensors.len()];
        for &h in &order {
            for a in &einsums[h.index()].accesses {
                let list = &mut consumers[a.tensor.index()];
                if !a.self_read && !list.contains(&h) {
                    list.push(h);
                }
            }
        }

        let mut parallel = Vec::new();
        for r in cascade.parallel_ranks() {
            for leaf in leaf_ranks(cascade, r) {
                if !parallel.contains(&leaf) {
                    parallel.push(leaf);
                }
            }
        }

        LeafCascade {
            cascade,
            einsums,
            order,
            tensor_dims,
            producer,
            consumers,
            parallel,
            warnings,
        }
    }

    pub fn einsum(&self, handle: Handle<Einsum>) -> &LeafEinsum {
        &self.einsums[handle.index()]
    }

    pub fn rank_name(&self, rank: Handle<Rank>) -> &str {
        &self.cascade.ranks[rank].name
    }

    pub fn extent(&self, rank: Handle<Rank>) -> u64 {
        self.cascade.ranks[rank].extent
    }

    pub fn tensor_name(&self, tensor: Handle<Tensor>) -> &str {
        &self.cascade.tensors[tensor].name
    }

    /// Whether `tensor` has a dimension spanning the leaf `rank`.
    pub fn tensor_has_rank(&self, tensor: Handle<Tensor>, rank: Handle<Rank>) -> bool {
        self.tensor_dims[tensor.index()]
            .iter()
            .any(|dim| dim.contains(&rank))
    }

    /// The leaf ranks of `tensor`, dimension by dimension, flattened.
    pub fn tensor_leaf_ranks(&self, tensor: Handle<Tensor>) -> Vec<Handle<Rank>> {
        self.tensor_dims[tensor.index()]
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    /// The leaf rank of the iterative dimension of a state tensor, if it is one.
    pub fn iterative_leaf(&self, tensor: Handle<Tensor>) -> Option<Handle<Rank>> {
        let t = &self.cascade.tensors[tensor];
        let dim = t.iterative?;
        self.tensor_dims[tensor.index()]
            .get(dim)
            .and_then(|leaves| leaves.first().copied())
    }

    /// For a split child, the split's parent rank.
    pub fn parent(&self, rank: Handle<Rank>) -> Option<Handle<Rank>> {
        self.cascade.ranks[rank].parent
    }

    /// Whether `rank` is the outer (`m1`) child of a split.
    pub fn is_outer_child(&self, rank: Handle<Rank>) -> bool {
        self.parent(rank)
            .and_then(|p| self.cascade.ranks[p].split.as_ref())
            .is_some_and(|s| s.outer == rank)
    }

    /// Whether `rank` is the tile (`m0`) child of a split.
    pub fn is_tile_child(&self, rank: Handle<Rank>) -> bool {
        self.parent(rank)
            .and_then(|p| self.cascade.ranks[p].split.as_ref())
            .is_some_and(|s| s.inner == rank)
    }

    /// The extent of the sequence a rank walks: for a split child, its topmost parent's.
    pub fn top_extent(&self, rank: Handle<Rank>) -> u64 {
        let mut r = rank;
        for _ in 0..16 {
            match self.parent(r) {
                Some(p) => r = p,
                None => break,
            }
        }
        self.extent(r)
    }

    /// Renders an index expression with rank names (`m1 + 1`, `16`).
    pub fn format_index(&self, index: &IndexExpr) -> String {
        let mut s = String::new();
        for (i, &(c, r)) in index.terms.iter().enumerate() {
            let name = self.rank_name(r);
            let term = match c {
                1 => name.to_string(),
                -1 => format!("-{name}"),
                _ => format!("{c}*{name}"),
            };
            if i > 0 && !term.starts_with('-') {
                s.push_str(" + ");
            } else if i > 0 {
                s.push_str(" - ");
                s.push_str(&term[1..]);
                continue;
            }
            s.push_str(&term);
        }
        if index.terms.is_empty() {
            return index.constant.to_string();
        }
        match index.constant {
            0 => {}
            c if c > 0 => s.push_str(&format!(" + {c}")),
            c => s.push_str(&format!(" - {}", -c)),
        }
        s
    }

    /// `RNV[16, p, f]`: an access rendered with rank names.
    pub fn format_access(&self, access: &LeafAccess) -> String {
        let idx: Vec<String> = access
            .indices
            .iter()
            .map(|i| self.format_index(i))
            .collect();
        format!("{}[{}]", self.tensor_name(access.tensor), idx.join(", "))
    }
}

fn leaf_einsum(
    cascade: &Cascade,
    handle: Handle<Einsum>,
    e: &Einsum,
    bodies: &[einattn_ir::validate::StepBody],
) -> LeafEinsum {
    let own_state = e.recurrence.as_ref().map(|_| e.output.tensor);
    // In a step body, reading a member recurrence's state at the current step reads the
    // previous step: like a recurrence's read of its own state, not a dependency.
    let body = bodies.iter().find(|b| b.einsums.contains(&handle));
    let carried = |a: &einattn_ir::Access| -> bool {
        let Some(b) = body else { return false };
        let current = b.einsums.iter().find_map(|&m| {
            let me = &cascade.einsums[m];
            me.recurrence
                .as_ref()
                .filter(|_| me.output.tensor == a.tensor)
                .map(|rec| rec.current_index())
        });
        let dim = cascade.tensors[a.tensor].iterative;
        current.is_some() && dim.and_then(|d| a.indices.get(d)) == current.as_ref()
    };
    let mut accesses = Vec::new();
    let mut collect = |expr: &Expr| {
        expr.visit_accesses(&mut |a| {
            accesses.push(LeafAccess {
                tensor: a.tensor,
                indices: a.indices.iter().map(|i| expand_index(cascade, i)).collect(),
                self_read: own_state == Some(a.tensor) || carried(a),
            })
        })
    };
    collect(&e.expr);
    for v in &e.value_mask {
        collect(&v.lhs);
        collect(&v.rhs);
    }
    if let Some(rec) = &e.recurrence {
        collect(&rec.init);
    }
    let value_mask = e
        .value_mask
        .iter()
        .map(|v| {
            format!(
                "{} {} {}",
                einattn_ir::print::expr_to_string(cascade, &v.lhs),
                v.op.symbol(),
                einattn_ir::print::expr_to_string(cascade, &v.rhs)
            )
        })
        .collect();

    let mut space = Vec::new();
    for r in cascade.iteration_ranks(handle) {
        for leaf in leaf_ranks(cascade, r) {
            if !space.contains(&leaf) {
                space.push(leaf);
            }
        }
    }

    let mut reductions = Vec::new();
    for red in &e.reductions {
        // Reducing a split parent reduces both children; the tile is the inner loop.
        for leaf in leaf_ranks(cascade, red.rank).into_iter().rev() {
            if !reductions.iter().any(|&(r, _)| r == leaf) {
                reductions.push((leaf, red.op));
            }
        }
    }

    let mut mask: Vec<LeafCondition> = Vec::new();
    for c in &e.mask {
        let lc = leaf_condition(cascade, c);
        if !mask.contains(&lc) {
            mask.push(lc);
        }
    }

    LeafEinsum {
        handle,
        name: cascade.tensors[e.output.tensor].name.clone(),
        output_tensor: e.output.tensor,
        output: e
            .output
            .indices
            .iter()
            .map(|i| expand_index(cascade, i))
            .collect(),
        accesses,
        space,
        reductions,
        mask,
        value_mask,
        recurrence_rank: e
            .recurrence
            .as_ref()
            .and_then(|rec| leaf_ranks(cascade, rec.rank).first().copied()),
        steps: match (&e.recurrence, body) {
            (Some(rec), _) => leaf_ranks(cascade, rec.rank)
                .first()
                .map(|&r| (r, rec.reverse)),
            (None, Some(b)) => {
                let reverse = b.einsums.iter().any(|&m| {
                    cascade.einsums[m]
                        .recurrence
                        .as_ref()
                        .is_some_and(|rec| rec.reverse)
                });
                leaf_ranks(cascade, b.rank).first().map(|&r| (r, reverse))
            }
            (None, None) => None,
        },
    }
}

/// Kahn's algorithm; among ready Einsums the earliest in the source goes first, so the
/// order is the written order whenever that order is already valid.
fn topological_order(
    einsums: &[LeafEinsum],
    producer: &[Option<Handle<Einsum>>],
    warnings: &mut Vec<String>,
) -> Vec<Handle<Einsum>> {
    let n = einsums.len();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
    for e in einsums {
        for a in &e.accesses {
            if a.self_read {
                continue;
            }
            if let Some(p) = producer.get(a.tensor.index()).copied().flatten() {
                if p != e.handle && !deps[e.handle.index()].contains(&p.index()) {
                    deps[e.handle.index()].push(p.index());
                }
            }
        }
    }
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next = (0..n).find(|&i| !done[i] && deps[i].iter().all(|&d| done[d]));
        match next {
            Some(i) => {
                done[i] = true;
                order.push(Handle::new(i));
            }
            None => {
                // A cycle outside a recurrence: the validator rejects it. Keep going in
                // source order so the analysis still reports something.
                let rest: Vec<usize> = (0..n).filter(|&i| !done[i]).collect();
                warnings.push(format!(
                    "dependency cycle among {} Einsums; they are analyzed in source order",
                    rest.len()
                ));
                for i in rest {
                    done[i] = true;
                    order.push(Handle::new(i));
                }
            }
        }
    }
    order
}

/// Checks that every handle in the cascade points into its arena, so the analysis can
/// index arenas freely. The validator guarantees this for parsed cascades; a cascade built
/// by hand or by a buggy pass may not.
pub(crate) fn check_handles(cascade: &Cascade) -> Result<(), String> {
    let n_ranks = cascade.ranks.len();
    let n_tensors = cascade.tensors.len();
    let rank_ok = |r: Handle<Rank>| r.index() < n_ranks;
    let index_ok = |i: &IndexExpr| i.terms.iter().all(|&(_, r)| rank_ok(r));
    let mut problems = Vec::new();
    for (_, r) in cascade.ranks.iter() {
        let split_ok = r
            .split
            .as_ref()
            .is_none_or(|s| rank_ok(s.outer) && rank_ok(s.inner));
        if !split_ok || !r.parent.is_none_or(rank_ok) {
            problems.push(format!("rank {} names a rank that does not exist", r.name));
        }
    }
    for (_, t) in cascade.tensors.iter() {
        if !t.ranks.iter().all(|&r| rank_ok(r)) {
            problems.push(format!(
                "tensor {} names a rank that does not exist",
                t.name
            ));
        }
        if t.iterative.is_some_and(|d| d >= t.ranks.len()) {
            problems.push(format!(
                "tensor {}: iterative dimension out of range",
                t.name
            ));
        }
    }
    for (h, e) in cascade.einsums.iter() {
        let mut ok = e.output.tensor.index() < n_tensors && e.output.indices.iter().all(index_ok);
        let mut visit = |expr: &Expr| {
            expr.visit_accesses(&mut |a| {
                ok &= a.tensor.index() < n_tensors
                    && a.indices.iter().all(index_ok)
                    && a.indices.len()
                        == cascade.tensors.get(a.tensor).map_or(0, |t| t.ranks.len());
            });
            expr.visit_indices(&mut |i| ok &= index_ok(i));
        };
        visit(&e.expr);
        if let Some(rec) = &e.recurrence {
            visit(&rec.init);
        }
        ok &= e.reductions.iter().all(|r| rank_ok(r.rank))
            && e.mask.iter().all(|c| index_ok(&c.lhs) && index_ok(&c.rhs))
            && e.value_mask.iter().all(|v| {
                let mut ok = true;
                v.visit_indices(&mut |i| ok &= index_ok(i));
                v.visit_accesses(&mut |a| {
                    ok &= a.tensor.index() < n_tensors
                        && a.indices.len()
                            == cascade.tensors.get(a.tensor).map_or(0, |t| t.ranks.len())
                });
                ok
            })
            && e.recurrence.as_ref().is_none_or(|rec| rank_ok(rec.rank));
        if !ok {
            problems.push(format!(
                "Einsum #{} names a tensor or rank that does not exist, or indexes a tensor with the wrong number of indices",
                h.index()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
