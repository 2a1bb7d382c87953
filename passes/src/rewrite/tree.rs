//! Between the Cascade IR and e-graph terms.
//!
//! [`TreeForm::build`] turns every non-recurrent Einsum into a term of [`Ein`], inlining the
//! temporaries it reads, so the algebra sees whole computations (`(Q K^T) V` as one term
//! rather than two Einsums). Recurrences, the Einsums of step bodies and Einsums with
//! data-dependent masks stay as they are ([`ir_util::opaque_einsums`]): the terms read
//! their outputs as leaves. [`materialize`] goes back: every reduction or mask in an extracted term becomes
//! an Einsum of its own, and so does a shared subterm with a transcendental in it (the
//! numerator of softmax, read by both the denominator and the contraction).

use super::ir_util;
use super::lang::{Ein, EinAnalysis, EinGraph, Leaf, Leaves, Num, RankSet, ReduceKey};
use egg::{Id, Language, RecExpr};
use einattn_ir::{
    Access, Cascade, Condition, Einsum, Expr, Handle, IndexExpr, Rank, Reduction, Span, Tensor,
    TensorKind,
};
use std::collections::{HashMap, HashSet};

/// A tensor the rewritten cascade must still produce under its own name.
#[derive(Clone, Debug)]
pub struct Root {
    pub tensor: Handle<Tensor>,
    /// The Einsum that produced it in the original cascade.
    pub einsum: Handle<Einsum>,
    /// The original output access (kept as written).
    pub output: Access,
    /// The term as built, before any rewriting.
    pub term: RecExpr<Ein>,
}

/// A cascade as e-graph terms.
pub struct TreeForm {
    pub leaves: Leaves,
    pub roots: Vec<Root>,
    /// Einsums left as they are (recurrences), in program order.
    pub kept: Vec<Handle<Einsum>>,
    /// Temporaries that were inlined, with the term of their own definition (its root in
    /// `definitions`): extraction names a materialized subterm after the temporary it
    /// equals.
    pub inlined_definitions: Vec<(Handle<Tensor>, Id)>,
    /// The terms of every inlined definition, in one expression whose nodes they share:
    /// a chain of `n` temporaries has `n` nodes here, where one standalone term per
    /// definition (each inlining the chain below it) had `n^2 / 2`.
    pub definitions: RecExpr<Ein>,
    /// Inlined temporaries the original cascade reads in more than one Einsum.
    pub shared: Vec<Handle<Tensor>>,
}

struct Builder<'c> {
    cascade: &'c Cascade,
    leaves: Leaves,
    may_be_absent: Vec<bool>,
    inlinable: Vec<bool>,
    /// The Einsum producing each tensor (`Cascade::producer` scans every Einsum).
    producers: Vec<Option<Handle<Einsum>>>,
    /// Inlined reads already built into the expression being built: (tensor, indices) to
    /// their term, so a temporary read again under the same indices is shared, not
    /// rebuilt. Cleared whenever building starts on another expression.
    memo: HashMap<(Handle<Tensor>, Vec<IndexExpr>), Id>,
    /// Nesting of the term being built: past [`MAX_INLINE_DEPTH`] temporaries are read,
    /// not inlined, so no term (and no recursion over one) outgrows the stack.
    depth: usize,
    /// Ranks bound inside a tensor's inlined definition (its reductions and theirs).
    bound: HashMap<Handle<Tensor>, RankSet>,
    /// Temporaries discovered to need their own Einsum.
    new_roots: Vec<Handle<Tensor>>,
}

impl TreeForm {
    pub fn build(cascade: &Cascade) -> TreeForm {
        let order = einattn_ir::validate::topological_order(cascade);
        let may_be_absent = ir_util::tensors_may_be_absent(cascade, &order);
        let mut kept_einsum = ir_util::opaque_einsums(cascade);
        // The first Einsum writing each tensor, as `Cascade::producer` finds it.
        let mut producers: Vec<Option<Handle<Einsum>>> = vec![None; cascade.tensors.len()];
        for (h, e) in cascade.einsums.iter() {
            if let Some(slot) = producers.get_mut(e.output.tensor.index()) {
                slot.get_or_insert(h);
            }
        }
        let producer = |t: Handle<Tensor>| producers.get(t.index()).copied().flatten();
        let inlinable: Vec<bool> = cascade
            .tensors
            .iter()
            .map(|(h, t)| {
                t.kind == TensorKind::Temp
                    && t.iterative.is_none()
                    && producer(h).is_some_and(|p| {
                        let e = &cascade.einsums[p];
                        !kept_einsum[p.index()] && plain_distinct(&e.output.indices)
                    })
            })
            .collect();
        // A temporary that cannot be inlined (its output is written at a combined index,
        // `PS[b, h, m, p]` from `m1, m0`) is neither a root nor part of a term: its Einsum
        // is kept as it is, or the terms reading it would read a tensor nobody produces.
        for (h, e) in cascade.einsums.iter() {
            let t = e.output.tensor;
            if cascade.tensors[t].kind == TensorKind::Temp && !inlinable[t.index()] {
                kept_einsum[h.index()] = true;
            }
        }
        let mut b = Builder {
            cascade,
            leaves: Leaves::default(),
            may_be_absent,
            inlinable,
            producers: producers.clone(),
            memo: HashMap::new(),
            depth: 0,
            bound: HashMap::new(),
            new_roots: Vec::new(),
        };

        let kept: Vec<Handle<Einsum>> = order
            .iter()
            .copied()
            .filter(|&e| kept_einsum[e.index()])
            .collect();
        // Roots: outputs, and temporaries read by a kept Einsum.
        let mut root_tensors: Vec<Handle<Tensor>> = Vec::new();
        for &e in &order {
            let einsum = &cascade.einsums[e];
            let t = einsum.output.tensor;
            if !kept_einsum[e.index()] && cascade.tensors[t].kind == TensorKind::Output {
                root_tensors.push(t);
            }
        }
        for &e in &kept {
            let einsum = &cascade.einsums[e];
            let mut reads = Vec::new();
            einsum.visit_reads(&mut |a| reads.push(a.tensor));
            for t in reads {
                if b.inlinable[t.index()] && !root_tensors.contains(&t) {
                    root_tensors.push(t);
                }
            }
        }

        let mut roots: Vec<Root> = Vec::new();
        let mut next = 0;
        while next < root_tensors.len() {
            let tensor = root_tensors[next];
            next += 1;
            let Some(einsum) = producer(tensor) else {
                continue;
            };
            let mut term = RecExpr::default();
            b.memo.clear();
            b.einsum_term(&mut term, einsum, &HashMap::new());
            roots.push(Root {
                tensor,
                einsum,
                output: cascade.einsums[einsum].output.clone(),
                term,
            });
            for t in std::mem::take(&mut b.new_roots) {
                if !root_tensors.contains(&t) {
                    root_tensors.push(t);
                }
            }
        }

        let mut inlined_definitions = Vec::new();
        let mut definitions = RecExpr::default();
        b.memo.clear();
        let roots_set: HashSet<Handle<Tensor>> = root_tensors.iter().copied().collect();
        for (t, _) in cascade.tensors.iter() {
            if b.inlinable[t.index()] && !roots_set.contains(&t) {
                if let Some(e) = producer(t) {
                    let identity: Vec<IndexExpr> = cascade.einsums[e].output.indices.clone();
                    // A definition is the term its readers inline under its own indices:
                    // built once, and reused by the definitions that read it.
                    let id = match b.memo.get(&(t, identity.clone())) {
                        Some(&id) => id,
                        None => {
                            let id = b.einsum_term(&mut definitions, e, &HashMap::new());
                            b.memo.insert((t, identity), id);
                            id
                        }
                    };
                    inlined_definitions.push((t, id));
                }
            }
        }
        let mut readers = vec![0usize; cascade.tensors.len()];
        for (_, e) in cascade.einsums.iter() {
            let mut seen = Vec::new();
            e.expr.visit_accesses(&mut |a| {
                if !seen.contains(&a.tensor) {
                    seen.push(a.tensor);
                    readers[a.tensor.index()] += 1;
                }
            });
        }
        let shared = inlined_definitions
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| readers[t.index()] >= 2)
            .collect();
        TreeForm {
            leaves: b.leaves,
            roots,
            kept,
            inlined_definitions,
            definitions,
            shared,
        }
    }

    /// An e-graph holding every root term and inlined definition.
    pub fn egraph(&self, explanations: bool) -> (EinGraph, Vec<Id>) {
        let mut egraph = EinGraph::new(EinAnalysis {
            leaves: self.leaves.clone(),
        });
        if explanations {
            egraph = egraph.with_explanations_enabled();
        }
        let ids = self
            .roots
            .iter()
            .map(|r| egraph.add_expr(&r.term))
            .collect();
        if !self.definitions.as_ref().is_empty() {
            egraph.add_expr(&self.definitions);
        }
        egraph.rebuild();
        (egraph, ids)
    }

    /// The e-class of each inlined definition (in `inlined_definitions` order) in an
    /// e-graph built by [`TreeForm::egraph`] and rewritten since; what
    /// `EGraph::lookup_expr` gives for each term, in one pass over the shared nodes.
    pub fn definition_classes(&self, egraph: &EinGraph) -> Vec<(Handle<Tensor>, Option<Id>)> {
        let mut classes: Vec<Option<Id>> = Vec::with_capacity(self.definitions.as_ref().len());
        for node in self.definitions.as_ref() {
            let mut complete = true;
            let node = node
                .clone()
                .map_children(|c| match classes[usize::from(c)] {
                    Some(id) => id,
                    None => {
                        complete = false;
                        c
                    }
                });
            classes.push(if complete { egraph.lookup(node) } else { None });
        }
        self.inlined_definitions
            .iter()
            .map(|&(t, root)| (t, classes.get(usize::from(root)).copied().flatten()))
            .collect()
    }
}

/// How deep a term may nest before its temporaries are read instead of inlined. A chain of
/// thousands of temporaries inlined into one term overflowed the stack of every recursion
/// over terms (`optimize` of a 20,000-Einsum chain aborted); one statement nests at most
/// a few hundred deep, and the examples' inlined terms a few dozen.
pub const MAX_INLINE_DEPTH: usize = 256;

fn plain_distinct(indices: &[IndexExpr]) -> bool {
    let ranks: Vec<Option<Handle<Rank>>> = indices.iter().map(IndexExpr::as_rank).collect();
    ranks.iter().all(Option::is_some)
        && ranks
            .iter()
            .enumerate()
            .all(|(i, r)| !ranks[..i].contains(r))
}

impl Builder<'_> {
    fn producer(&self, tensor: Handle<Tensor>) -> Option<Handle<Einsum>> {
        self.producers.get(tensor.index()).copied().flatten()
    }

    /// The inlinable temporaries the definition of `tensor` reads.
    fn inlined_reads(&self, tensor: Handle<Tensor>) -> Vec<Handle<Tensor>> {
        let mut reads = Vec::new();
        if let Some(e) = self.producer(tensor) {
            self.cascade.einsums[e].expr.visit_accesses(&mut |a| {
                if a.tensor != tensor && self.inlinable[a.tensor.index()] {
                    reads.push(a.tensor);
                }
            });
        }
        reads
    }

    /// Ranks bound anywhere inside the inlined definition of `tensor`. Depth-first with
    /// an explicit stack: a chain of temporaries is as deep as it is long.
    fn bound_ranks(&mut self, tensor: Handle<Tensor>) -> RankSet {
        let mut stack = vec![(tensor, false)];
        // Entered and not finished: a read of one of these is a cycle (a cascade the
        // validator rejects), counted as binding nothing rather than followed forever.
        let mut open: HashSet<Handle<Tensor>> = HashSet::new();
        while let Some((t, reads_done)) = stack.pop() {
            if self.bound.contains_key(&t) {
                continue;
            }
            let reads = self.inlined_reads(t);
            if !reads_done {
                if !open.insert(t) {
                    continue;
                }
                stack.push((t, true));
                stack.extend(
                    reads
                        .into_iter()
                        .filter(|r| !self.bound.contains_key(r) && !open.contains(r))
                        .map(|r| (r, false)),
                );
                continue;
            }
            let own = self.producer(t).map_or(RankSet::default(), |e| {
                RankSet::of(self.cascade.einsums[e].reductions.iter().map(|r| r.rank))
            });
            let set = reads.iter().fold(own, |s, r| {
                s.union(self.bound.get(r).copied().unwrap_or_default())
            });
            self.bound.insert(t, set);
        }
        self.bound.get(&tensor).copied().unwrap_or_default()
    }

    /// The term of Einsum `e` with its free ranks renamed by `rename`.
    fn einsum_term(
        &mut self,
        rec: &mut RecExpr<Ein>,
        e: Handle<Einsum>,
        rename: &HashMap<Handle<Rank>, IndexExpr>,
    ) -> Id {
        let einsum = &self.cascade.einsums[e];
        let mut term = self.expr_term(rec, &einsum.expr, rename);
        // Masks sit at the innermost reduction among their ranks, as the interpreter
        // checks them; conditions over free ranks only wrap the whole term.
        let mut placed = vec![false; einsum.mask.len()];
        for red in &einsum.reductions {
            for (k, c) in einsum.mask.iter().enumerate() {
                if placed[k] {
                    continue;
                }
                let level = innermost_reduction(einsum, c);
                if level == Some(red.rank) {
                    placed[k] = true;
                    term = self.mask(rec, c, rename, term);
                }
            }
            let op = rec.add(Ein::Leaf(Leaf::Op(ReduceKey::of(red.op))));
            let rank = rec.add(Ein::Leaf(Leaf::Rank(red.rank.index() as u32)));
            term = rec.add(Ein::Reduce([op, rank, term]));
        }
        for (k, c) in einsum.mask.iter().enumerate() {
            if !placed[k] {
                term = self.mask(rec, c, rename, term);
            }
        }
        term
    }

    fn mask(
        &mut self,
        rec: &mut RecExpr<Ein>,
        c: &Condition,
        rename: &HashMap<Handle<Rank>, IndexExpr>,
        body: Id,
    ) -> Id {
        let c = Condition {
            lhs: ir_util::substitute_index(&c.lhs, rename),
            op: c.op,
            rhs: ir_util::substitute_index(&c.rhs, rename),
            span: c.span,
        };
        let cond = rec.add(Ein::Leaf(self.leaves.condition(&c)));
        rec.add(Ein::Mask([cond, body]))
    }

    fn expr_term(
        &mut self,
        rec: &mut RecExpr<Ein>,
        expr: &Expr,
        rename: &HashMap<Handle<Rank>, IndexExpr>,
    ) -> Id {
        self.depth += 1;
        let id = self.expr_term_inner(rec, expr, rename);
        self.depth -= 1;
        id
    }

    fn expr_term_inner(
        &mut self,
        rec: &mut RecExpr<Ein>,
        expr: &Expr,
        rename: &HashMap<Handle<Rank>, IndexExpr>,
    ) -> Id {
        match expr {
            Expr::Literal(v) => rec.add(Ein::Num(Num::new(*v))),
            Expr::Index(i) => {
                let i = ir_util::substitute_index(i, rename);
                rec.add(Ein::Leaf(self.leaves.index(&i)))
            }
            Expr::Unary(op, a) => {
                let a = self.expr_term(rec, a, rename);
                rec.add(Ein::unary(*op, a))
            }
            Expr::Binary(op, a, b) => {
                let a = self.expr_term(rec, a, rename);
                let b = self.expr_term(rec, b, rename);
                rec.add(Ein::binary(*op, a, b))
            }
            Expr::Access(access) => {
                let indices: Vec<IndexExpr> = access
                    .indices
                    .iter()
                    .map(|i| ir_util::substitute_index(i, rename))
                    .collect();
                let t = access.tensor;
                if let Some(&id) = self.memo.get(&(t, indices.clone())) {
                    return id;
                }
                let shallow = self.depth < MAX_INLINE_DEPTH;
                if let (true, true, Some(e)) =
                    (shallow, self.inlinable[t.index()], self.producer(t))
                {
                    let producer = &self.cascade.einsums[e];
                    // Only ranks that change under the renaming can be captured by a
                    // reduction inside the definition; identity renamings shadow safely.
                    let moved = RankSet::of(
                        producer
                            .output
                            .indices
                            .iter()
                            .zip(&indices)
                            .filter(|(o, i)| o != i)
                            .flat_map(|(_, i)| i.ranks().collect::<Vec<_>>()),
                    );
                    let captured = self.bound_ranks(t).0 & moved.0 != 0;
                    if !captured {
                        let inner: HashMap<Handle<Rank>, IndexExpr> = producer
                            .output
                            .indices
                            .iter()
                            .zip(&indices)
                            .filter_map(|(o, i)| o.as_rank().map(|r| (r, i.clone())))
                            .collect();
                        let id = self.einsum_term(rec, e, &inner);
                        self.memo.insert((t, indices), id);
                        return id;
                    }
                }
                if self.inlinable[t.index()] && !self.new_roots.contains(&t) {
                    self.new_roots.push(t);
                }
                let access = Access {
                    tensor: t,
                    indices,
                    span: access.span,
                };
                let absent = self.may_be_absent[t.index()];
                rec.add(Ein::Leaf(self.leaves.access(&access, absent)))
            }
        }
    }
}

/// The reduction (innermost first) at which the interpreter checks `c`: the innermost
/// reduced rank it mentions, or `None` when it mentions only free ranks.
fn innermost_reduction(e: &Einsum, c: &Condition) -> Option<Handle<Rank>> {
    e.reductions
        .iter()
        .find(|red| c.lhs.mentions(red.rank) || c.rhs.mentions(red.rank))
        .map(|red| red.rank)
}

/// Picks one e-node per e-class (an extraction).
pub trait Choice {
    fn node(&self, class: Id) -> &Ein;
}

/// Rebuilds a cascade from chosen e-nodes: the roots keep their tensors; every reduction,
/// mask and shared transcendental subterm becomes an Einsum of its own.
pub fn materialize(
    original: &Cascade,
    form: &TreeForm,
    egraph: &EinGraph,
    root_classes: &[Id],
    choice: &dyn Choice,
) -> Cascade {
    let mut m = Materializer {
        original,
        egraph,
        choice,
        leaves: &egraph.analysis.leaves,
        out: original.clone(),
        einsums: Vec::new(),
        memo: HashMap::new(),
        uses: HashMap::new(),
        named: HashMap::new(),
    };
    m.out.einsums = Default::default();
    for (t, class) in form.definition_classes(egraph) {
        if let Some(class) = class {
            m.named.entry(egraph.find(class)).or_insert(t);
        }
    }
    // Roots with plain outputs are readable by other terms that contain them.
    for (root, &class) in form.roots.iter().zip(root_classes) {
        if plain_distinct(&root.output.indices) {
            let class = egraph.find(class);
            m.memo.entry(class).or_insert_with(|| {
                (
                    root.tensor,
                    root.output
                        .indices
                        .iter()
                        .filter_map(IndexExpr::as_rank)
                        .collect(),
                )
            });
        }
    }
    let mut seen = HashSet::new();
    for &class in root_classes {
        m.count_uses(egraph.find(class), &mut seen);
    }
    for (root, &class) in form.roots.iter().zip(root_classes) {
        let einsum = m.einsum_from(
            egraph.find(class),
            root.output.clone(),
            original.einsums[root.einsum].span,
        );
        m.einsums.push(einsum);
    }
    for &e in &form.kept {
        m.einsums.push(original.einsums[e].clone());
    }
    let mut out = m.out;
    for e in m.einsums {
        out.einsums.append(e);
    }
    ir_util::tidy(&mut out);
    out
}

struct Materializer<'a> {
    original: &'a Cascade,
    egraph: &'a EinGraph,
    choice: &'a dyn Choice,
    leaves: &'a Leaves,
    out: Cascade,
    einsums: Vec<Einsum>,
    /// Classes already stored in a tensor, with the tensor's ranks.
    memo: HashMap<Id, (Handle<Tensor>, Vec<Handle<Rank>>)>,
    /// How many chosen parents read each class.
    uses: HashMap<Id, usize>,
    /// Classes equal to an inlined temporary's definition.
    named: HashMap<Id, Handle<Tensor>>,
}

impl Materializer<'_> {
    fn node(&self, class: Id) -> &Ein {
        self.choice.node(self.egraph.find(class))
    }

    fn free(&self, class: Id) -> RankSet {
        self.egraph[class].data.free
    }

    fn count_uses(&mut self, class: Id, seen: &mut HashSet<Id>) {
        if !seen.insert(class) {
            return;
        }
        let children: Vec<Id> = self.node(class).children().to_vec();
        for c in children {
            let c = self.egraph.find(c);
            *self.uses.entry(c).or_default() += 1;
            self.count_uses(c, seen);
        }
    }

    /// One Einsum computing `class` into `output`: leading reductions and masks are peeled
    /// off while the interpreter would place them where the term has them.
    fn einsum_from(&mut self, class: Id, output: Access, span: Span) -> Einsum {
        let root_free = self.free(class);
        let mut peeled: Vec<Reduction> = Vec::new();
        let mut mask: Vec<Condition> = Vec::new();
        let mut cur = class;
        loop {
            match self.node(cur).clone() {
                Ein::Reduce([op, rank, body]) => {
                    let (Some(r), Some(op)) =
                        (self.egraph[rank].data.rank, self.egraph[op].data.reduce_op)
                    else {
                        break;
                    };
                    // A reduction read by several terms is stored once, not folded into
                    // each reader.
                    let shared = cur != class && self.uses.get(&cur).copied().unwrap_or(0) >= 2;
                    if shared || root_free.contains(r) || peeled.iter().any(|p| p.rank == r) {
                        break;
                    }
                    peeled.push(Reduction {
                        rank: r,
                        op: op.op(),
                    });
                    cur = self.egraph.find(body);
                }
                Ein::Mask([cond, body]) => {
                    // A masked term read by several terms (the causal score, read by the
                    // max and by the exponential) is stored once, like a shared reduction:
                    // folding it into each reader would repeat its contraction.
                    let shared = cur != class && self.uses.get(&cur).copied().unwrap_or(0) >= 2;
                    if shared {
                        break;
                    }
                    let Some(Leaf::Cond(c)) = leaf_of(self.node(cond)) else {
                        break;
                    };
                    let condition = self.leaves.conditions[c as usize].clone();
                    let ranks = RankSet::of(condition.lhs.ranks().chain(condition.rhs.ranks()));
                    let peeled_set = RankSet::of(peeled.iter().map(|p| p.rank));
                    let in_scope = ranks.0 & !(root_free.0 | peeled_set.0) == 0;
                    let at_level = match peeled.last() {
                        None => true,
                        Some(last) => ranks.contains(last.rank),
                    };
                    if !(in_scope && at_level) {
                        break;
                    }
                    mask.push(condition);
                    cur = self.egraph.find(body);
                }
                _ => break,
            }
        }
        let expr = if peeled.is_empty() && mask.is_empty() && cur == class {
            // The root itself is a map: lower its node, not a read of itself.
            self.lower_node(cur)
        } else {
            self.lower(cur)
        };
        peeled.reverse();
        Einsum {
            output,
            expr,
            reductions: peeled,
            mask,
            value_mask: Vec::new(),
            recurrence: None,
            span,
        }
    }

    fn lower(&mut self, class: Id) -> Expr {
        let class = self.egraph.find(class);
        if let Some((tensor, ranks)) = self.memo.get(&class) {
            return Expr::Access(Access {
                tensor: *tensor,
                indices: ranks.iter().map(|&r| IndexExpr::rank(r)).collect(),
                span: Span::UNKNOWN,
            });
        }
        let node = self.node(class).clone();
        let needs_einsum = matches!(node, Ein::Reduce(_) | Ein::Mask(_))
            || (self.uses.get(&class).copied().unwrap_or(0) >= 2 && self.worth_sharing(class));
        if needs_einsum {
            self.store(class);
            return self.lower(class);
        }
        self.lower_node(class)
    }

    fn lower_node(&mut self, class: Id) -> Expr {
        let node = self.node(class).clone();
        match node {
            Ein::Num(n) => Expr::Literal(n.value()),
            Ein::Leaf(Leaf::Access(i)) => Expr::Access(self.leaves.accesses[i as usize].clone()),
            Ein::Leaf(Leaf::Index(i)) => Expr::Index(self.leaves.indices[i as usize].clone()),
            ref n => {
                if let Some((op, [a, b])) = n.as_binary() {
                    let a = self.lower(a);
                    let b = self.lower(b);
                    Expr::binary(op, a, b)
                } else if let Some((op, a)) = n.as_unary() {
                    let a = self.lower(a);
                    Expr::unary(op, a)
                } else {
                    // Reductions, masks and binder leaves never reach here: `lower` stores
                    // the first two, and the last only appear under a reduction.
                    let tensor = self.store(class);
                    Expr::Access(Access {
                        tensor,
                        indices: self.memo[&class]
                            .1
                            .iter()
                            .map(|&r| IndexExpr::rank(r))
                            .collect(),
                        span: Span::UNKNOWN,
                    })
                }
            }
        }
    }

    /// A shared subterm is stored when recomputing it would repeat a transcendental.
    fn worth_sharing(&self, class: Id) -> bool {
        fn has_transcendental(m: &Materializer, class: Id, depth: usize) -> bool {
            if depth > 32 || m.memo.contains_key(&m.egraph.find(class)) {
                return false;
            }
            let node = m.node(class);
            matches!(
                node,
                Ein::Exp(_) | Ein::Log(_) | Ein::Sqrt(_) | Ein::Tanh(_)
            ) || (!matches!(node, Ein::Reduce(_) | Ein::Mask(_))
                && node
                    .children()
                    .iter()
                    .any(|&c| has_transcendental(m, c, depth + 1)))
        }
        !matches!(self.node(class), Ein::Leaf(_) | Ein::Num(_))
            && has_transcendental(self, class, 0)
    }

    /// Emits the Einsum that stores `class` and records it in `memo`.
    fn store(&mut self, class: Id) -> Handle<Tensor> {
        let class = self.egraph.find(class);
        if let Some((t, _)) = self.memo.get(&class) {
            return *t;
        }
        let free = self.free(class);
        let (tensor, ranks) = match self.named.get(&class) {
            Some(&t) if RankSet::of(self.original.tensors[t].ranks.iter().copied()) == free => {
                (t, self.original.tensors[t].ranks.clone())
            }
            _ => {
                let ranks = free.ranks();
                let t = self.out.tensors.append(Tensor {
                    name: String::new(),
                    ranks: ranks.clone(),
                    kind: TensorKind::Temp,
                    dtype: None,
                    iterative: None,
                    default: None,
                    span: Span::UNKNOWN,
                });
                (t, ranks)
            }
        };
        let output = Access {
            tensor,
            indices: ranks.iter().map(|&r| IndexExpr::rank(r)).collect(),
            span: Span::UNKNOWN,
        };
        let einsum = self.einsum_from(class, output, Span::UNKNOWN);
        self.memo.insert(class, (tensor, ranks));
        if self.out.tensors[tensor].name.is_empty() {
            let name = ir_util::fresh_name(
                &self.out,
                &ir_util::name_from_reads(&self.out, &einsum.expr),
            );
            self.out.tensors[tensor].name = name;
        }
        self.einsums.push(einsum);
        tensor
    }
}

fn leaf_of(node: &Ein) -> Option<Leaf> {
    match node {
        Ein::Leaf(l) => Some(*l),
        _ => None,
    }
}
